"""The tracker against a server nobody listens on, and against one that comes up while logging is under way."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from robustfm.config import TrackingConfig
from robustfm.runtime import free_loopback_port
from robustfm.testing.processes import stop_process_group
from robustfm.tracking import MlflowTracker, create_tracker

N_CALLS = 200


def unreachable_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING and "cannot be reached" in r.getMessage()]


def log_training(tracker) -> tuple[float, str]:
    """A job run with a nested stage: params, N_CALLS metric calls, an artifact.

    Returns:
        (seconds taken by the log calls, the job's run id)
    """
    job = tracker.start_run("job")
    job.log_params({"train": {"lr": 0.1}, "api_key": "SHOULD-NOT-LEAK"})
    started = time.perf_counter()
    # Unreachable store: waits only until the writer's first attempt fails (mlflow is imported meanwhile).
    job_id = job.run_id
    assert time.perf_counter() - started < 10.0
    stage = tracker.start_run("stage1", parent_run_id=job_id)
    started = time.perf_counter()
    for step in range(N_CALLS):
        stage.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    stage.log_text("notes", "notes.txt")
    stage.end()
    job.end()
    return time.perf_counter() - started, job_id


@pytest.fixture(autouse=True)
def _fast_failing_mlflow_http(monkeypatch):
    # The tracker sets its own fast-failing values when none are given; restored after each test.
    for name in (
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
    ):
        monkeypatch.delenv(name, raising=False)


def runs_by_name(uri: str, experiment: str) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} in {uri}"
    return client, {r.info.run_name: r for r in client.search_runs([found.experiment_id])}


@pytest.mark.timeout(120)
def test_unreachable_server_never_blocks_and_everything_lands_in_the_fallback_store(tmp_path, caplog):
    uri = f"http://user:pw-SHOULD-NOT-LEAK@127.0.0.1:{free_loopback_port()}"
    cfg = TrackingConfig(uri=uri, experiment="offline", fallback_dir=str(tmp_path / "fallback"))
    tracker = create_tracker(cfg)
    with caplog.at_level(logging.INFO):
        seconds, job_id = log_training(tracker)
        assert seconds < 2.0, f"{N_CALLS} log calls took {seconds:.2f} s against an unreachable server"
        assert job_id.startswith("local-")
        time.sleep(1.5)  # several retries of the writer happen meanwhile
        assert len(unreachable_warnings(caplog)) == 1
        assert f"127.0.0.1:{uri.rsplit(':', 1)[1]}" in unreachable_warnings(caplog)[0].getMessage()
        tracker.close(timeout_s=1.0)
    assert len(unreachable_warnings(caplog)) == 1
    assert "SHOULD-NOT-LEAK" not in caplog.text
    fallback_uri = f"sqlite:///{tmp_path / 'fallback' / 'mlflow.db'}"
    assert fallback_uri in caplog.text  # the close warning says where the logs went

    client, runs = runs_by_name(fallback_uri, "offline")
    assert set(runs) == {"job", "stage1"}
    stage = runs["stage1"]
    assert stage.data.tags["mlflow.parentRunId"] == runs["job"].info.run_id
    assert stage.info.status == "FINISHED"
    history = sorted(client.get_metric_history(stage.info.run_id, "loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(s, 1.0 / (s + 1)) for s in range(N_CALLS)]
    assert runs["job"].data.params == {"train.lr": "0.1"}
    assert [a.path for a in client.list_artifacts(stage.info.run_id)] == ["notes.txt"]


@pytest.mark.timeout(120)
def test_server_that_accepts_but_never_answers(tmp_path, caplog, monkeypatch):
    """A hung server: the writer is stuck inside a request when close() runs, and close does not wait for it."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "90")  # waiting for this request would show as a slow close
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)  # the kernel completes connections; nobody ever reads or answers
        uri = f"http://127.0.0.1:{hung.getsockname()[1]}"
        tracker = MlflowTracker(uri, "hung", fallback_dir=tmp_path / "fallback", run_id_wait_s=1.0)
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"  # MLflow itself fails fast on this client
        with caplog.at_level(logging.WARNING):
            run = tracker.start_run("job")
            started = time.perf_counter()
            for step in range(N_CALLS):
                run.log_metrics({"loss": float(step)}, step=step)
            assert time.perf_counter() - started < 2.0
            started = time.perf_counter()
            assert run.run_id.startswith("local-")  # waited run_id_wait_s for an answer, then gave up
            stage = tracker.start_run("stage", parent_run_id=run.run_id)  # no second wait
            stage.log_metrics({"loss": 1.0})
            assert time.perf_counter() - started < 1.0 + 0.5
            assert len(unreachable_warnings(caplog)) == 1
            started = time.perf_counter()
            tracker.close(timeout_s=1.0)
            close_s = time.perf_counter() - started
    client, runs = runs_by_name(f"sqlite:///{tmp_path / 'fallback' / 'mlflow.db'}", "hung")
    assert len(client.get_metric_history(runs["job"].info.run_id, "loss")) == N_CALLS
    assert runs["stage"].data.tags["mlflow.parentRunId"] == runs["job"].info.run_id
    # close gave up on the stuck request after its 1 s + 2 s grace; the rest is the fallback store's creation.
    assert close_s < 60.0, f"close took {close_s:.1f} s: it waited for the hung request"
    assert "local fallback store" in caplog.text


@pytest.mark.slow  # starting `mlflow server` takes 5-10 s on an idle 2-core machine
@pytest.mark.timeout(300)
def test_buffered_logs_are_flushed_when_the_server_comes_back(tmp_path, caplog):
    port = free_loopback_port()
    uri = f"http://127.0.0.1:{port}"
    cfg = TrackingConfig(uri=uri, experiment="comeback", fallback_dir=str(tmp_path / "fallback"))
    tracker = create_tracker(cfg)
    with caplog.at_level(logging.INFO):
        seconds, _ = log_training(tracker)
        assert seconds < 2.0
        deadline = time.monotonic() + 30
        while not unreachable_warnings(caplog) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(unreachable_warnings(caplog)) == 1

        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", *f"--host 127.0.0.1 --port {port} --workers 1".split()]
            + ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}"]
            + ["--artifacts-destination", str(tmp_path / "server-artifacts")],
            cwd=tmp_path,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # as infra/mlflow-local.sh runs it
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: the CLI starts uvicorn workers that must stop with it
        )
        try:
            wait_for_health(uri, server, timeout_s=180)
            assert tracker.flush(timeout_s=60), "buffered logs were not written after the server came back"
            tracker.close(timeout_s=10)
            client, runs = runs_by_name(uri, "comeback")
            stage = runs["stage1"]
            assert stage.data.tags["mlflow.parentRunId"] == runs["job"].info.run_id
            history = sorted(client.get_metric_history(stage.info.run_id, "loss"), key=lambda m: m.step)
            assert [(m.step, m.value) for m in history] == [(s, 1.0 / (s + 1)) for s in range(N_CALLS)]
            assert [a.path for a in client.list_artifacts(stage.info.run_id)] == ["notes.txt"]
        finally:
            stop_process_group(server)
    assert len(unreachable_warnings(caplog)) == 1
    assert not Path(tmp_path / "fallback").exists()  # nothing needed the fallback


def wait_for_health(uri: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, "mlflow server exited"
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"mlflow server at {uri} did not become healthy in {timeout_s} s")
