"""Experiment tracking: an MLflow tracker that never slows training down, and a no-op tracker with the same methods.

Pick one once with :func:`create_tracker` and call it unconditionally; code never branches on whether tracking is on::

    uri = resolve_tracking_uri(cfg.tracking)          # on the driver; hand the string to Ray workers, trials, jobs
    with create_tracker(cfg.tracking, uri) as tracker, tracker.start_run("cgclip") as run:
        run.log_params(cfg)                           # flattened; secret-looking keys are dropped
        with tracker.start_run("stage1", parent_run_id=run.run_id) as stage:
            stage.log_metrics({"loss": 0.3}, step=10)

Every call on a run only appends to an ordered in-memory queue that a background thread writes to MLflow (see
:mod:`robustfm.tracking.writer`). If the server cannot be reached, the tracker warns once, keeps everything, and writes
it when the server answers again; whatever is still unwritten at :meth:`Tracker.close` goes into a local SQLite
fallback store, whose location is logged. mlflow itself is imported only by the writer thread.
"""

from __future__ import annotations

from robustfm.tracking.base import (
    RUN_STATUSES,
    SECRET_WORDS,
    NullRun,
    NullTracker,
    TrackedRun,
    Tracker,
    create_tracker,
    is_secret_key,
    redact_nested,
    resolve_tracking_uri,
    without_secrets,
)


def __getattr__(name: str):  # MlflowTracker/MlflowRun on demand: the package itself stays light
    if name in ("MlflowTracker", "MlflowRun"):
        from robustfm.tracking import mlflow_tracker

        return getattr(mlflow_tracker, name)
    raise AttributeError(f"module 'robustfm.tracking' has no attribute {name!r}")


__all__ = [
    "RUN_STATUSES",
    "SECRET_WORDS",
    "MlflowRun",
    "MlflowTracker",
    "NullRun",
    "NullTracker",
    "TrackedRun",
    "Tracker",
    "create_tracker",
    "is_secret_key",
    "redact_nested",
    "resolve_tracking_uri",
    "without_secrets",
]
