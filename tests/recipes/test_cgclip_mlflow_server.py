"""jobs/cgclip.py against a real MLflow tracking server (infra/mlflow-local.sh) on loopback: the parent run, the
engine's stage runs and the milestone runs all land on the server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from robustfm.runtime import free_loopback_port
from tests.recipes.conftest import REPO, run_job, tiny_cgclip_overrides


@pytest.fixture
def mlflow_server(tmp_path):
    """infra/mlflow-local.sh on 127.0.0.1:<free port>, stopped (its whole process group) after the test."""
    port = free_loopback_port()
    # The `mlflow` entry point of the environment under test, whether or not that environment is activated.
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log_path = tmp_path / "mlflow-server.log"
    server = subprocess.Popen(
        ["bash", str(REPO / "infra" / "mlflow-local.sh"), str(tmp_path / "store")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log_path.open("wb"),
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log_tail = log_path.read_text(errors="replace")[-2000:]
                pytest.fail(f"mlflow server did not come up on {url} (exit code {server.poll()}):\n{log_tail}")
            time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
        except ProcessLookupError:  # a server that died on start-up leaves no process group to stop
            pass
        server.wait(timeout=30)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_cgclip_logs_parent_stage_and_milestone_runs_to_the_server(mlflow_server, demo_shards, tmp_path):
    from mlflow import MlflowClient

    from robustfm.testing.datasets import write_demo_shards

    # Another data set for the out-of-domain detection of every milestone (other photos' crops, other shapes).
    ood_shards = write_demo_shards(tmp_path / "ood", image_size=64, n_images=12, n_val=4, seed=7)
    overrides = tiny_cgclip_overrides(
        tmp_path,
        demo_shards,
        name="on-server",
        curriculum="[adapt]",
        **{
            "tracking.uri": mlflow_server,
            "tracking.experiment": "server-test",
            "eval.tsne": "false",
            "eval.suites": "[corruption_detection]",
            "data.ood.caltech.shards": str(ood_shards),
        },
    )
    done = run_job(["jobs/cgclip.py", "--config", "configs/cgclip/demo.yaml", *overrides], timeout=360)
    assert done.returncode == 0, done.stderr[-4000:]
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to a local store

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("server-test")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_name for p in parents] == ["on-server"]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["name"] == "on-server"
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    # the engine's run of the Adapt stage (written from the Ray Train worker) and the two milestones
    assert {"on-server-adapt/adapt", "milestone-pretrained", "milestone-adapt"} <= set(children), sorted(children)
    stage = children["on-server-adapt/adapt"]
    assert stage.data.tags["stage"] == "adapt" and "loss/total" in stage.data.metrics
    ood_key = "ood/caltech/corruption_detection/zero_shot/set/seen/auroc"
    for milestone in ("milestone-pretrained", "milestone-adapt"):
        metrics = children[milestone].data.metrics
        assert any(k.startswith("corruption_detection/") for k in metrics), milestone
        assert 0.0 <= metrics[ood_key] <= 1.0, milestone
        # the out-of-domain suite run, nested under the milestone, read the OOD shards (split "train", 12 images)
        nested = {
            r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == children[milestone].info.run_id
        }
        ood_run = nested["eval/ood-caltech/corruption_detection"]
        assert any(str(ood_shards) in value for value in ood_run.data.params.values()), ood_run.data.params
        assert ood_run.data.metrics["counts/scored"] == 12
    assert any(k.startswith("adapt/corruption_detection/") for k in parent.data.metrics)
    assert f"adapt/{ood_key}" in parent.data.metrics
    assert "ood/caltech/zero_shot/set/seen/auroc" in (tmp_path / "on-server" / "detection_table.md").read_text()
