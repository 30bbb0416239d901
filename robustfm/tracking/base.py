"""The tracking interface: runs and trackers, the no-op tracker, secret filtering and where runs are stored.

Code picks a tracker once (:func:`create_tracker`) and calls it unconditionally: :class:`NullTracker` has the same
methods and logs nothing, so no caller branches on whether tracking is on.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from robustfm.config import ConfigError, TrackingConfig

logger = logging.getLogger("robustfm.tracking")

SECRET_WORDS = ("key", "token", "secret", "password")
"""A param, tag or dict key containing one of these (any case, in any dotted component) is never logged."""
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


def is_secret_key(key: str) -> bool:
    """Whether ``key`` (a dotted name) looks like it holds a credential: ``*key*``, ``*token*``, ``*secret*``, ..."""
    return any(word in part.lower() for part in key.split(".") for word in SECRET_WORDS)


def without_secrets(flat: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``flat`` minus secret-looking keys; the dropped key names (never values) are logged at debug level."""
    dropped = [key for key in flat if is_secret_key(str(key))]
    if dropped:
        logger.debug("Not logging %s that look like secrets: %s", what, ", ".join(map(str, dropped)))
    return {key: value for key, value in flat.items() if not is_secret_key(str(key))}


def redact_nested(data: Any) -> Any:
    """``data`` with secret-looking keys removed at every depth of nested mappings and lists."""
    if isinstance(data, Mapping):
        return {k: redact_nested(v) for k, v in data.items() if not is_secret_key(str(k))}
    if isinstance(data, (list, tuple)):
        return [redact_nested(v) for v in data]
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
    from robustfm.tracking.mlflow_tracker import MlflowTracker

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
