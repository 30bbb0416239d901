"""Experiment tracking: an MLflow tracker that never slows training down, and a no-op tracker with the same methods.

Pick one once with :func:`create_tracker` and call it unconditionally; code never branches on whether tracking is on::

    uri = resolve_tracking_uri(cfg.tracking)          # on the driver; hand the string to Ray workers, trials, jobs
    with create_tracker(cfg.tracking, uri) as tracker, tracker.start_run("cgclip") as run:
        run.log_params(cfg)                           # flattened; secret-looking keys are dropped
        with tracker.start_run("stage1", parent_run_id=run.run_id) as stage:
            stage.log_metrics({"loss": 0.3}, step=10)

Every call on a run only appends to an ordered in-memory queue that a background thread writes to MLflow (see
:mod:`robustfm.tracking_writer`). If the server cannot be reached, the tracker warns once, keeps everything, and writes
it when the server answers again; whatever is still unwritten at :meth:`Tracker.close` goes into a local SQLite
fallback store, whose location is logged. mlflow itself is imported only by the writer thread.
"""

from __future__ import annotations

import abc
import atexit
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from robustfm.config import ConfigError, TrackingConfig, flatten
from robustfm.tracking_ops import (
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
from robustfm.tracking_writer import MlflowSink, Writer, replay_into_fallback

logger = logging.getLogger("robustfm.tracking")

SECRET_WORDS = ("key", "token", "secret", "password")
"""A param, tag or dict key containing one of these (any case, in any dotted component) is never logged."""
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
DEFAULT_FALLBACK_DIR = "~/.cache/robustfm/mlflow-fallback"
# MLflow retries a failed HTTP call 7 times with backoff (minutes), and urllib3 warns at each retry. The writer thread
# retries on its own with backoff, so each call should fail fast and quietly; values the user exported win.
_FAST_FAILING_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def is_secret_key(key: str) -> bool:
    """Whether ``key`` (a dotted name) looks like it holds a credential: ``*key*``, ``*token*``, ``*secret*``, ..."""
    return any(word in part.lower() for part in key.split(".") for word in SECRET_WORDS)


def without_secrets(flat: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``flat`` minus secret-looking keys; the dropped key names (never values) are logged at debug level."""
    dropped = [key for key in flat if is_secret_key(str(key))]
    if dropped:
        logger.debug("Not logging %s that look like secrets: %s", what, ", ".join(map(str, dropped)))
    return {key: value for key, value in flat.items() if not is_secret_key(str(key))}


def _redact_nested(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _redact_nested(v) for k, v in data.items() if not is_secret_key(str(k))}
    if isinstance(data, (list, tuple)):
        return [_redact_nested(v) for v in data]
    return data


def resolve_tracking_uri(cfg: TrackingConfig) -> str | None:
    """The absolute tracking URI every process of a job should log to; call it once, on the driver.

    ``cfg.uri`` wins, then ``$MLFLOW_TRACKING_URI``, else a SQLite store ``<store_dir>/mlflow.db`` (created here; its
    artifacts go to ``<store_dir>/artifacts``). Relative SQLite paths are made absolute against the current directory,
    because Ray workers, trials and jobs each run in another working directory.

    Returns:
        The URI, or None when ``cfg.backend`` is ``"none"``.

    Raises:
        ConfigError: for a plain path given as URI (ambiguous: say ``sqlite:///path/mlflow.db`` or use ``store_dir``).
    """
    if cfg.backend == "none":
        return None
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None:
        store = Path(cfg.store_dir).expanduser().resolve()
        store.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{store / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        path, sep, query = uri[len("sqlite:///") :].partition("?")
        absolute = Path(path).expanduser().resolve()
        absolute.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{absolute}{sep}{query}"
    if ":" not in uri:
        source = "tracking.uri" if cfg.uri else "MLFLOW_TRACKING_URI"
        raise ConfigError(
            source, f"{uri!r} is a plain path; give a URI such as sqlite:///{uri}/mlflow.db, or set tracking.store_dir"
        )
    return uri


def create_tracker(cfg: TrackingConfig, uri: str | None = None) -> Tracker:
    """The tracker for ``cfg``, chosen once: :class:`NullTracker` for backend ``none``, else :class:`MlflowTracker`.

    Args:
        cfg: the tracking section of the resolved config.
        uri: the URI resolved by the driver (:func:`resolve_tracking_uri`); Ray workers must pass it. None resolves it
            here, which is right only on the driver.
    """
    if cfg.backend == "none":
        return NullTracker()
    return MlflowTracker(uri or resolve_tracking_uri(cfg), cfg.experiment, fallback_dir=cfg.fallback_dir)


# --- the interface ----------------------------------------------------------------------------------------------------


class TrackedRun(abc.ABC):
    """One run (a job, a stage, a sweep trial). A context manager: ends FINISHED, or FAILED on an exception."""

    @property
    @abc.abstractmethod
    def run_id(self) -> str:
        """The run's MLflow id, to pass as ``parent_run_id`` of nested runs (also to other processes)."""

    @abc.abstractmethod
    def log_params(self, params: Mapping[str, Any] | Any) -> None:
        """Log a (nested) mapping or config dataclass as flattened ``a.b.c`` params, minus secret-looking keys."""

    @abc.abstractmethod
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log numbers (anything ``float()`` accepts) at ``step`` (None: 0, MLflow's default)."""

    @abc.abstractmethod
    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Log a file or folder under ``artifact_path``. A private copy is taken now; the caller may change it."""

    @abc.abstractmethod
    def log_text(self, text: str, artifact_file: str) -> None:
        """Log ``text`` as the artifact ``artifact_file`` (e.g. ``"notes/summary.md"``)."""

    @abc.abstractmethod
    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """Log ``data`` as JSON (or YAML for a ``.yaml``/``.yml`` name), minus secret-looking keys at any depth."""

    @abc.abstractmethod
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set string tags (values are ``str()``-ed); secret-looking keys are dropped."""

    @abc.abstractmethod
    def end(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED). Ending twice does nothing."""

    def __enter__(self) -> TrackedRun:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.end("FINISHED" if exc_type is None else "FAILED")


class Tracker(abc.ABC):
    """Starts runs in one store and owns the background writer. A context manager that closes on exit."""

    @property
    @abc.abstractmethod
    def uri(self) -> str | None:
        """The tracking URI (None for the no-op tracker)."""

    @abc.abstractmethod
    def start_run(
        self, name: str, parent_run_id: str | None = None, tags: Mapping[str, Any] | None = None
    ) -> TrackedRun:
        """Start a run now (never waits on the store); ``parent_run_id`` nests it (tag ``mlflow.parentRunId``)."""

    @abc.abstractmethod
    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything logged so far is written; False when ``timeout_s`` passed first."""

    @abc.abstractmethod
    def close(self, timeout_s: float = 30.0) -> None:
        """End open runs, write what is buffered (for at most ``timeout_s``); the rest goes to the fallback store."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# --- the no-op tracker ----------------------------------------------------------------------------------------------


class NullRun(TrackedRun):
    """A run that logs nothing. ``run_id`` is ``""`` (falsy, so ``parent_run_id=run.run_id or None`` works)."""

    @property
    def run_id(self) -> str:
        return ""

    def log_params(self, params: Mapping[str, Any] | Any) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass


class NullTracker(Tracker):
    """Tracking switched off (``backend: none``): the same methods as :class:`MlflowTracker`, doing nothing."""

    @property
    def uri(self) -> str | None:
        return None

    def start_run(self, name: str, parent_run_id: str | None = None, tags: Mapping[str, Any] | None = None) -> NullRun:
        return NullRun()

    def flush(self, timeout_s: float = 30.0) -> bool:
        return True

    def close(self, timeout_s: float = 30.0) -> None:
        pass


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
        clean = _redact_nested(data)
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
