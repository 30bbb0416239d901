"""The tracker against a real local MLflow store (SQLite in tmp_path), the URI resolution and the no-op tracker."""

from __future__ import annotations

import inspect
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from robustfm.config import ConfigError, TrackingConfig
from robustfm.tracking import (
    MlflowRun,
    MlflowTracker,
    NullRun,
    NullTracker,
    create_tracker,
    is_secret_key,
    resolve_tracking_uri,
)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    """One SQLite store for the module (creating its tables takes seconds); each test logs its own runs."""
    return tmp_path_factory.mktemp("mlruns")


@pytest.fixture
def store(store_dir, tmp_path, monkeypatch):
    """(config, resolved URI, MlflowClient) of the module's store, resolved from ``store_dir`` like a driver does."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(store_dir.parent)
    cfg = TrackingConfig(store_dir=store_dir.name, experiment="unit", fallback_dir=str(tmp_path / "fallback"))
    uri = resolve_tracking_uri(cfg)
    assert uri == f"sqlite:///{store_dir}/mlflow.db"
    monkeypatch.chdir(tmp_path)  # log from elsewhere, as Ray workers do
    from mlflow import MlflowClient

    return cfg, uri, MlflowClient(tracking_uri=uri)


def test_resolve_uri_is_absolute_sqlite_under_store_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(TrackingConfig(store_dir="runs/here")) == f"sqlite:///{tmp_path}/runs/here/mlflow.db"
    assert (tmp_path / "runs" / "here").is_dir()
    # Config beats the environment; relative SQLite paths become absolute; other URIs stay as given.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(TrackingConfig()) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri(TrackingConfig(uri="sqlite:///db/m.db")) == f"sqlite:///{tmp_path}/db/m.db"
    assert resolve_tracking_uri(TrackingConfig(backend="none")) is None
    with pytest.raises(ConfigError, match="tracking.uri"):
        resolve_tracking_uri(TrackingConfig(uri="some/dir"))


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("data.s3.access_key_id", True),
        ("API_TOKEN", True),
        ("db.Password", True),
        ("aws.SecretAccess", True),
        ("model.name", False),
        ("train.lr", False),
    ],
)
def test_secret_keys(key, secret):
    assert is_secret_key(key) is secret


def test_importing_tracking_does_not_import_mlflow():
    code = "import sys, robustfm.tracking; assert 'mlflow' not in sys.modules, 'mlflow imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.timeout(120)
def test_run_params_metrics_artifacts_and_nesting(store, store_dir, tmp_path, caplog):
    cfg, uri, client = store
    artifact = tmp_path / "report.txt"
    artifact.write_text("hello")
    config = {
        "model": {"name": "open_clip/tiny-vit", "lr": 1e-3},
        "data": {"s3": {"secret_key": "SHOULD-NOT-LEAK"}},
        "auth_token": "SHOULD-NOT-LEAK",
        "note": "x" * 7000,
    }
    with caplog.at_level(logging.DEBUG, logger="robustfm.tracking"):
        with create_tracker(cfg, uri) as tracker:
            assert isinstance(tracker, MlflowTracker)
            with tracker.start_run("job", tags={"kind": "unit"}) as run:
                run.log_params(config)
                for step in range(5):
                    run.log_metrics({"loss": 1.0 / (step + 1), "acc": step / 10}, step=step)
                run.log_artifact(artifact, "reports")
                artifact.write_text("rewritten after logging")  # the tracker took its own copy at call time
                artifact.unlink()
                run.log_text("some notes", "notes/summary.md")
                run.log_dict({"a": 1, "nested": {"password": "SHOULD-NOT-LEAK"}}, "summary.json")
                run.set_tags({"phase": "done", "hf_token": "SHOULD-NOT-LEAK"})
                with tracker.start_run("stage1", parent_run_id=run.run_id) as stage:
                    stage.log_metrics({"stage_loss": 0.5}, step=3)
                parent_id, stage_id = run.run_id, stage.run_id

    assert "SHOULD-NOT-LEAK" not in caplog.text
    assert "data.s3.secret_key" in caplog.text and "auth_token" in caplog.text  # says which were dropped

    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "job"
    assert parent.data.params["model.name"] == "open_clip/tiny-vit" and parent.data.params["model.lr"] == "0.001"
    assert "data.s3.secret_key" not in parent.data.params and "auth_token" not in parent.data.params
    assert len(parent.data.params["note"]) == 6000  # truncated to MLflow's limit instead of rejected
    assert parent.data.tags["kind"] == "unit" and parent.data.tags["phase"] == "done"
    assert "hf_token" not in parent.data.tags
    history = client.get_metric_history(parent_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(s, 1.0 / (s + 1)) for s in range(5)]

    stage = client.get_run(stage_id)
    assert stage.data.tags["mlflow.parentRunId"] == parent_id
    assert [(m.step, m.value) for m in client.get_metric_history(stage_id, "stage_loss")] == [(3, 0.5)]

    artifacts_dir = Path(client.download_artifacts(parent_id, "", str(tmp_path / "downloaded")))
    assert (artifacts_dir / "reports" / "report.txt").read_text() == "hello"
    assert (artifacts_dir / "notes" / "summary.md").read_text() == "some notes"
    assert json.loads((artifacts_dir / "summary.json").read_text()) == {"a": 1, "nested": {}}
    # Artifacts live beside the database, not in whatever directory the process happened to run in.
    assert Path(parent.info.artifact_uri.removeprefix("file://")).is_relative_to(store_dir / "artifacts")
    assert not (tmp_path / "fallback").exists()


@pytest.mark.timeout(120)
def test_failed_run_and_child_run_in_another_tracker(store):
    cfg, uri, client = store
    tracker = create_tracker(cfg, uri)
    with pytest.raises(RuntimeError, match="boom"), tracker.start_run("crashes") as run:
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="has ended"):
        run.log_metrics({"late": 1.0})
    # A Ray worker gets only the URI and the parent id string and builds its own tracker.
    with create_tracker(cfg, uri) as worker_tracker, worker_tracker.start_run("trial", parent_run_id=run.run_id) as t:
        t.log_metrics({"score": 2.0})
    tracker.close()
    assert client.get_run(run.run_id).info.status == "FAILED"
    assert client.get_run(t.run_id).data.tags["mlflow.parentRunId"] == run.run_id
    with pytest.raises(RuntimeError, match="closed"):
        tracker.start_run("after close")


def test_null_tracker_has_the_same_public_methods_and_does_nothing(tmp_path, monkeypatch):
    def public(cls):
        """Public methods with their parameters (names, defaults, annotations); properties (run_id, uri) map to None."""
        members = [(n, m) for n, m in inspect.getmembers(cls) if not n.startswith("_")]
        return {n: tuple(inspect.signature(m).parameters.values()) if callable(m) else None for n, m in members}

    assert public(NullTracker).keys() >= {"start_run", "close", "flush"}
    assert public(NullTracker).keys() == public(MlflowTracker).keys()
    assert public(NullTracker) == public(MlflowTracker)
    assert public(NullRun) == public(MlflowRun)
    assert {"run_id", "log_params", "log_metrics", "log_artifact", "log_text", "log_dict", "set_tags", "end"} <= set(
        public(NullRun)
    )

    monkeypatch.chdir(tmp_path)
    tracker = create_tracker(TrackingConfig(backend="none"))
    assert isinstance(tracker, NullTracker) and tracker.uri is None
    with tracker, tracker.start_run("x", tags={"a": 1}) as run:
        run.log_params({"a": 1})
        run.log_metrics({"m": 1.0}, step=1)
        run.log_artifact(tmp_path / "missing-is-fine-here")
        run.log_text("t", "t.txt")
        run.log_dict({"a": 1}, "a.json")
        run.set_tags({"b": 2})
        assert run.run_id == ""
    assert tracker.flush() is True
    assert list(tmp_path.iterdir()) == []  # wrote nothing anywhere


@pytest.mark.timeout(120)
def test_batches_respect_mlflow_limits_and_a_rejected_entry_costs_only_itself(store, caplog):
    cfg, uri, client = store
    many_params = {f"group{g}": {f"p{i}": i for i in range(50)} for g in range(5)}  # 250 > 100 per batch
    many_metrics = {f"m{i}": float(i) for i in range(1500)}  # > 1000 per batch
    with create_tracker(cfg, uri) as tracker, tracker.start_run("big") as run:
        run.log_params(many_params)
        run.log_metrics(many_metrics, step=7)
        run.log_params({"fixed": 1})
        assert tracker.flush(timeout_s=60)
        with caplog.at_level(logging.WARNING, logger="robustfm.tracking"):
            # MLflow refuses to change a param; the metric and the new param in the same batch must still land.
            run.log_params({"fixed": 2, "fresh": "yes"})
            run.log_metrics({"after": 1.0})
            assert tracker.flush(timeout_s=60)
    logged = client.get_run(run.run_id).data
    assert len(logged.params) == 250 + 2 and logged.params["group4.p49"] == "49"
    assert logged.params["fixed"] == "1" and logged.params["fresh"] == "yes"
    assert len(logged.metrics) == 1500 + 1 and logged.metrics["m1499"] == 1499.0
    assert client.get_metric_history(run.run_id, "m3")[0].step == 7
    rejected = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(rejected) == 1 and "log of fixed to run 'big'" in rejected[0]
