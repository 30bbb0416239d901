"""The MLflow tracker: every call queues an operation that one background thread writes (see ``writer.py``).

If the server cannot be reached, the tracker warns once, keeps everything, and writes it when the server answers
again; whatever is still unwritten at :meth:`MlflowTracker.close` goes into a local SQLite fallback store, whose
location is logged. mlflow itself is imported only by the writer thread.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from robustfm.config import flatten
from robustfm.tracking.base import RUN_STATUSES, TrackedRun, Tracker, redact_nested, without_secrets
from robustfm.tracking.ops import (
    CreateRun,
    EndRun,
    LogArtifact,
    LogBatch,
    LogText,
    RunRecord,
    new_local_id,
    now_ms,
    redact,
    spool,
)
from robustfm.tracking.writer import MlflowSink, Writer, replay_into_fallback

logger = logging.getLogger("robustfm.tracking")
DEFAULT_FALLBACK_DIR = "~/.cache/robustfm/mlflow-fallback"
# MLflow retries a failed HTTP call 7 times with backoff (minutes), and urllib3 warns at each retry. The writer thread
# retries on its own with backoff, so each call should fail fast and quietly; values the user exported win.
_FAST_FAILING_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


# --- MLflow -----------------------------------------------------------------------------------------------------------


class MlflowRun(TrackedRun):
    """A run of :class:`MlflowTracker`. Each call validates its input here and queues it for the writer thread."""

    def __init__(self, tracker: MlflowTracker, record: RunRecord) -> None:
        self._tracker = tracker
        self._record = record

    @property
    def run_id(self) -> str:
        """The MLflow id, waiting up to the tracker's ``run_id_wait_s`` for the store to create the run.

        If the store is unreachable it returns the run's local id (``local-...``) instead, at once: this tracker maps it
        to the real id when writing, and other processes record it as tag ``robustfm.parent_local_run_id``.
        """
        record = self._record
        deadline = time.monotonic() + self._tracker._run_id_wait_s
        # Stop waiting as soon as the writer finds the store unreachable: training must not stall on it.
        while record.mlflow_id is None and not self._tracker._offline and time.monotonic() < deadline:
            record.created.wait(0.05)
        if record.mlflow_id is None and not self._tracker._offline:  # a hung store: later runs should not wait too
            self._tracker._writer.went_offline(TimeoutError(f"no answer in {self._tracker._run_id_wait_s:g} s"))
        if record.mlflow_id is None:
            logger.debug("Run %r has no MLflow id yet (store unreachable); using its local id", record.name)
            return record.local_id
        return record.mlflow_id

    def _ensure_open(self) -> None:
        if self._record.status is not None:
            raise RuntimeError(f"run {self._record.name!r} has ended; start a new run to log more")

    def log_params(self, params: Mapping[str, Any] | Any) -> None:
        self._ensure_open()
        flat = without_secrets(flatten(params), "params")
        if flat:
            self._tracker._put(LogBatch(self._record, params=[(str(k), str(v)) for k, v in flat.items()]))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._ensure_open()
        timestamp, step = now_ms(), 0 if step is None else int(step)
        entries = []
        for key, value in metrics.items():
            try:
                entries.append((str(key), float(value), timestamp, step))
            except (TypeError, ValueError):
                raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}") from None
        if entries:
            self._tracker._put(LogBatch(self._record, metrics=entries))

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._ensure_open()
        path = Path(local_path)
        if not path.exists():
            raise FileNotFoundError(f"artifact {str(path)!r} does not exist")
        self._tracker._put(LogArtifact(self._record, spool(path, self._tracker._spool_dir), artifact_path))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._ensure_open()
        self._tracker._put(LogText(self._record, str(text), artifact_file))

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self._ensure_open()
        clean = redact_nested(data)
        if artifact_file.endswith((".yaml", ".yml")):
            import yaml

            text = yaml.safe_dump(clean, sort_keys=False)
        else:
            text = json.dumps(clean, indent=2, default=str)
        self._tracker._put(LogText(self._record, text, artifact_file))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._ensure_open()
        clean = without_secrets(tags, "tags")
        if clean:
            self._tracker._put(LogBatch(self._record, tags=[(str(k), str(v)) for k, v in clean.items()]))

    def end(self, status: str = "FINISHED") -> None:
        if status not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
        if self._record.status is not None:
            return
        self._record.status, self._record.end_ms = status, now_ms()
        self._tracker._put(EndRun(self._record, status, self._record.end_ms))


class MlflowTracker(Tracker):
    """Logs to an MLflow store through one background writer thread; see the module docstring.

    Args:
        uri: an absolute tracking URI (from :func:`resolve_tracking_uri` on the driver).
        experiment: experiment name, created on first use.
        fallback_dir: local folder for the fallback SQLite store (None: ``~/.cache/robustfm/mlflow-fallback``).
        run_id_wait_s: how long :attr:`MlflowRun.run_id` waits for a reachable store to create the run.
    """

    def __init__(
        self, uri: str, experiment: str, fallback_dir: str | os.PathLike | None = None, run_id_wait_s: float = 30.0
    ) -> None:
        if uri.startswith(("http://", "https://")):
            for name, value in _FAST_FAILING_HTTP.items():
                os.environ.setdefault(name, value)
        self._uri = uri
        self._shown_uri = redact(uri)
        self._experiment = experiment
        self._fallback_dir = Path(fallback_dir or DEFAULT_FALLBACK_DIR).expanduser().resolve()
        self._run_id_wait_s = run_id_wait_s
        self._runs: dict[str, RunRecord] = {}
        self._spool_dir = Path(tempfile.mkdtemp(prefix="robustfm-tracking-"))
        self._closed = False
        self._writer = Writer(lambda: MlflowSink(uri, experiment, self._runs, primary=True), self._shown_uri)
        atexit.register(self._close_at_exit)

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def _offline(self) -> bool:
        """Whether the last write attempt failed to reach the store."""
        return self._writer.offline

    def _put(self, op: Any) -> None:
        if self._closed:
            raise RuntimeError("the tracker is closed; create a new one to log more")
        self._writer.put(op)

    def start_run(
        self, name: str, parent_run_id: str | None = None, tags: Mapping[str, Any] | None = None
    ) -> MlflowRun:
        parent = parent_run_id or None
        # A parent of this tracker is referred to by local id, so that the fallback store links it too.
        for record in list(self._runs.values()):
            if parent is not None and record.mlflow_id == parent:
                parent = record.local_id
        clean_tags = {str(k): str(v) for k, v in without_secrets(tags or {}, "tags").items()}
        record = RunRecord(new_local_id(), name, parent, clean_tags, now_ms())
        self._runs[record.local_id] = record
        self._put(CreateRun(record))
        return MlflowRun(self, record)

    def flush(self, timeout_s: float = 30.0) -> bool:
        return self._writer.wait_idle(timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        if self._closed:
            return
        for record in list(self._runs.values()):
            if record.status is None:
                MlflowRun(self, record).end("FINISHED")
        self._closed = True
        atexit.unregister(self._close_at_exit)
        self._writer.wait_idle(timeout_s)
        # A request in flight ends within MLflow's HTTP timeout; past this grace its operation is replayed too.
        unwritten = self._writer.stop(join_timeout_s=2.0)
        if unwritten:
            metrics = sum(len(op.metrics) for op in unwritten if isinstance(op, LogBatch))
            fallback_uri = replay_into_fallback(unwritten, self._fallback_dir, self._experiment, self._runs)
            logger.warning(
                "MLflow tracking store %s did not take %d logged operations (%d metric values) before close; they are "
                "in the local fallback store %s (browse with `mlflow ui --backend-store-uri %s`).",
                self._shown_uri,
                len(unwritten),
                metrics,
                fallback_uri,
                fallback_uri,
            )
        shutil.rmtree(self._spool_dir, ignore_errors=True)

    def _close_at_exit(self) -> None:
        self.close(timeout_s=10.0)
