"""The driver resolves the tracking URI once; a Ray worker in another working directory logs a nested run with it."""

from __future__ import annotations

import os

import pytest

from robustfm.config import TrackingConfig
from robustfm.tracking import create_tracker, resolve_tracking_uri


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_worker_logs_a_nested_run_into_the_drivers_store(ray_session, tmp_path, monkeypatch):
    # Defined here so that Ray pickles it by value (the test module is not importable on workers).
    def log_trial(uri: str, parent_run_id: str, workdir: str) -> str:
        """What a trial or Train worker does: its own tracker from the URI string, a child run of the driver's run."""
        previous = os.getcwd()
        os.chdir(workdir)  # Ray jobs, trials and workers each run in a directory of their own
        try:
            with create_tracker(TrackingConfig(experiment="ray"), uri) as tracker:
                with tracker.start_run("trial-0", parent_run_id=parent_run_id) as run:
                    run.log_params({"trial": {"lr": 0.01}})
                    for step in range(3):
                        run.log_metrics({"score": float(step)}, step=step)
                    return run.run_id
        finally:
            os.chdir(previous)

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = TrackingConfig(store_dir="mlruns", experiment="ray")
    uri = resolve_tracking_uri(cfg)
    (tmp_path / "elsewhere").mkdir()
    with create_tracker(cfg, uri) as tracker, tracker.start_run("sweep") as parent:
        parent_id = parent.run_id
        remote = ray_session.remote(num_cpus=0.5)(log_trial)
        trial_id = ray_session.get(remote.remote(uri, parent_id, str(tmp_path / "elsewhere")))

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    trial = client.get_run(trial_id)
    assert trial.data.tags["mlflow.parentRunId"] == parent_id
    assert trial.data.params == {"trial.lr": "0.01"}
    assert [m.value for m in sorted(client.get_metric_history(trial_id, "score"), key=lambda m: m.step)] == [0, 1, 2]
    assert not any((tmp_path / "elsewhere").iterdir())  # nothing was written relative to the worker's directory
