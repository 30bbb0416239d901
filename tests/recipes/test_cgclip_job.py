"""CG-CLIP end to end: `ray job submit` against a local head with token auth, logging to a real MLflow tracking
server (infra/mlflow-local.sh) on loopback, with an out-of-domain set; and resume after a killed worker."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from robustfm.runtime import free_loopback_port
from robustfm.testing.processes import stop_process_group
from tests.recipes.conftest import JOB_TIMEOUT_S, REPO, run_job, tiny_cgclip_overrides

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture  # one test's: a module-scoped head idled (~10% of a core) through the module's other tests
def ray_head(tmp_path_factory):
    """A Ray head on 127.0.0.1 with its dashboard and token authentication, set up as the README tells users:
    ``RAY_AUTH_MODE=token``, ``ray get-auth-token --generate``, ``ray start --head ... --dashboard-host 127.0.0.1``."""
    home = tmp_path_factory.mktemp("home")  # ~/.ray/auth_token of this test only
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)  # would send `ray job submit` to another Ray's dashboard
    token = subprocess.run(["ray", "get-auth-token", "--generate"], env=env, capture_output=True, text=True, timeout=60)
    assert token.returncode == 0, token.stderr
    assert (home / ".ray" / "auth_token").is_file()
    dashboard = free_loopback_port()
    # A temp dir of its own: `ray start` records its address there, and a plain ray.init() elsewhere in the test
    # session must not find (and try to join) this head.
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")
    head = subprocess.Popen(
        [
            "ray",
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            f"--port={free_loopback_port()}",
            "--dashboard-host",
            "127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--num-cpus",
            "2",
            "--include-dashboard",
            "true",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
            # Ports of their own: the test session's Ray already holds the defaults (its dashboard agent on 52365),
            # and a head whose job agent cannot bind answers every submission with "No available agent".
            f"--dashboard-agent-listen-port={free_loopback_port()}",
            f"--dashboard-agent-grpc-port={free_loopback_port()}",
            f"--runtime-env-agent-port={free_loopback_port()}",
            f"--metrics-export-port={free_loopback_port()}",
            f"--ray-client-server-port={free_loopback_port()}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # 401 without the token: the dashboard is up and enforces auth
            break
        except OSError:
            time.sleep(1)
    else:
        os.killpg(head.pid, signal.SIGTERM)
        pytest.fail("the Ray head's dashboard did not come up within 120 s")
    yield address, env
    # Ray's own shutdown of a --block head took 35-55 s here, the pytest worker idle: 10 s, then SIGKILL.
    stop_process_group(head, term_grace_s=10)
    shutil.rmtree(temp_dir, ignore_errors=True)


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
        # A tracking server only: MLflow 3's job executor (huey consumers: 7 processes when on) stays off.
        assert not [cmd for cmd in _session_commands(server.pid) if "huey" in cmd], _session_commands(server.pid)
        yield url
    finally:
        stop_process_group(server)


def _session_commands(session_id: int) -> list[str]:
    """Command lines of the processes in a session (the server was started in one of its own)."""
    commands = []
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            if proc.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[3]) == session_id:
                commands.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, ValueError):
            continue
    return commands


@pytest.mark.timeout(JOB_TIMEOUT_S + 420)
def test_ray_job_submit_runs_cgclip_end_to_end(ray_head, mlflow_server, demo_shards, tmp_path):
    from robustfm.testing.datasets import write_demo_shards

    address, env = ray_head
    # Another data set for the out-of-domain detection of every milestone (other photos' crops, other shapes).
    ood_shards = write_demo_shards(tmp_path / "ood", image_size=64, n_images=12, n_val=4, seed=7)
    overrides = tiny_cgclip_overrides(
        tmp_path,
        demo_shards,
        name="submitted",
        # every stage trains; the pretrained and final milestones are evaluated (each costs ~40 s on 2 cores)
        **{
            "tracking.uri": mlflow_server,
            "data.ood.caltech.shards": str(ood_shards),
            "eval.milestones": "[pretrained,final]",
        },
    )
    submission_id = f"cgclip-test-{uuid.uuid4().hex[:8]}"
    command = [
        "ray",
        "job",
        "submit",
        "--address",
        address,
        "--submission-id",
        submission_id,
        "--working-dir",
        str(REPO),
        "--",
        sys.executable,
        "jobs/cgclip.py",
        "--config",
        "configs/cgclip/demo.yaml",
        *overrides,
    ]
    deadline = time.time() + 300  # the head's job agent starts after its dashboard answers (slow on a busy machine)
    try:
        while True:
            submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
            if "No available agent to submit job" not in submit.stderr or time.time() > deadline:
                break
            time.sleep(10)
    finally:  # a job left running (this test timed out) would take the head's CPUs from the tests after it
        stop = ["ray", "job", "stop", "--address", address, submission_id]
        subprocess.run(stop, env=env, capture_output=True, timeout=120)
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-2000:]
    assert "succeeded" in submit.stdout
    assert "CG-CLIP finished." in submit.stdout

    from mlflow.tracking import MlflowClient

    # Everything went to the server, nothing to a local store: the parent run, the engine's stage runs (written from
    # the Ray Train workers), the milestones and the out-of-domain suite runs nested under them.
    assert not (tmp_path / "mlflow.db").exists()
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("cgclip-demo")
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_name for p in parents] == ["submitted"]
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.params["name"] == "submitted"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    stage_runs = [r for r in children if r.data.tags.get("stage")]
    assert sorted(r.data.tags["stage"] for r in stage_runs) == ["adapt", "isolate", "tune"]
    assert all(r.info.status == "FINISHED" and "loss/total" in r.data.metrics for r in stage_runs)
    assert "adapt-isolate-tune/corruption_detection/zero_shot/all/auroc" in parent.data.metrics
    assert "pretrained/zero_shot/clean/top1" in parent.data.metrics
    tsne = [a.path for a in client.list_artifacts(parent.info.run_id, "tsne")]
    assert "tsne/pretrained.png" in tsne and "tsne/adapt-isolate-tune.png" in tsne
    ood_key = "ood/caltech/corruption_detection/zero_shot/set/seen/auroc"
    milestones = {r.info.run_name: r for r in children if r.info.run_name.startswith("milestone-")}
    assert set(milestones) == {"milestone-pretrained", "milestone-adapt-isolate-tune"}, sorted(milestones)
    for name, milestone in milestones.items():
        assert 0.0 <= milestone.data.metrics[ood_key] <= 1.0, name
        # the out-of-domain suite run read the OOD shards (split "train", 12 images)
        nested = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == milestone.info.run_id}
        ood_run = nested["eval/ood-caltech/corruption_detection"]
        assert any(str(ood_shards) in value for value in ood_run.data.params.values()), ood_run.data.params
        assert ood_run.data.metrics["counts/scored"] == 12
    assert f"adapt-isolate-tune/{ood_key}" in parent.data.metrics
    assert not [key for key in parent.data.metrics if key.startswith(("adapt/", "adapt-isolate/"))]  # not evaluated
    assert "ood/caltech/zero_shot/set/seen/auroc" in (tmp_path / "submitted" / "detection_table.md").read_text()

    # The exported tower has no decoder and loads back with open_clip itself.
    import open_clip
    import torch
    from safetensors.torch import load_file

    from robustfm.models import create_model

    exported = tmp_path / "submitted" / "export" / "adapt-isolate-tune" / "model.safetensors"
    state = load_file(exported)
    assert not [k for k in state if "decoder" in k]
    create_model("open_clip/tiny-vit")  # registers the tiny config with open_clip
    clip = open_clip.create_model("tiny-vit")
    clip.load_state_dict(state, strict=True)
    stage_state = load_file(tmp_path / "submitted" / "stages" / "adapt-isolate-tune" / "task.safetensors")
    visual_key = next(k for k in state if k.startswith("visual."))
    assert torch.equal(state[visual_key], next(v for k, v in stage_state.items() if k.endswith(visual_key)))


@pytest.mark.timeout(2 * JOB_TIMEOUT_S + 120)
def test_worker_killed_in_stage_two_resumes_from_its_checkpoint(demo_shards, tmp_path):
    base = [
        "jobs/cgclip.py",
        "--config",
        "configs/cgclip/demo.yaml",
        *tiny_cgclip_overrides(
            tmp_path,
            demo_shards,
            name="killed",
            **{
                "curriculum": "[adapt,isolate]",
                "eval.enabled": "false",  # no milestone between the stages: both train in one Ray Train run
                "train.stages.adapt.max_batches_per_epoch": "2",
                "train.stages.isolate.max_batches_per_epoch": "5",
                "train.checkpoint_every_steps": "2",
            },
        ),
    ]
    # Adapt is global steps 1-2, Isolate 3-7, with checkpoints at steps 2 (Adapt's end) and 4; every worker dies
    # (os._exit) right after step 5, in the middle of Isolate.
    first = run_job([*base, "train.fail_at_step=5"])
    assert first.returncode != 0
    saved = tmp_path / "killed" / "stages" / "adapt-isolate" / "task.safetensors"
    assert not saved.exists(), first.stdout[-3000:] + first.stderr[-3000:]

    second = run_job(base)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert saved.is_file()
    assert not (tmp_path / "killed" / "stages" / "adapt").exists()  # inside the group: no weights of its own

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("cgclip-demo")
    stage_runs = client.search_runs([experiment.experiment_id], max_results=500)
    adapt_runs = [r for r in stage_runs if r.data.tags.get("stage") == "adapt"]
    assert len(adapt_runs) == 1  # stage 1 was not trained again
    isolate_runs = [r for r in stage_runs if r.data.tags.get("stage") == "isolate"]
    resumed = sorted(int(r.data.tags.get("resumed_at_step", "0")) for r in isolate_runs)
    assert resumed == [2, 4], f"stage 2 did not resume from its step-4 checkpoint: {resumed}"
