"""The operations a tracker queues, and the pure helpers around them (batching, splitting, redaction, spooling).

An operation carries everything needed to apply it later to any MLflow store: values are converted, timestamps taken
and files spooled on the caller's thread, so that replaying an operation minutes later (or into the fallback store)
records what happened when it was logged.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("robustfm.tracking")

LOCAL_ID_PREFIX = "local-"
"""Run ids handed out before the store has answered start with this; they never reach MLflow as run ids."""

# MLflow error codes that retrying cannot fix: the entries that caused them are dropped (with a warning) instead.
_PERMANENT_ERROR_CODES = frozenset(
    {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE", "BAD_REQUEST"}
)
_USERINFO = re.compile(r"(\w[\w+.-]*://)[^/@\s]+@")


def redact(text: str) -> str:
    """``text`` with any ``scheme://user:password@`` credentials in URIs replaced by ``***``."""
    return _USERINFO.sub(r"\1***@", text)


def new_local_id() -> str:
    return f"{LOCAL_ID_PREFIX}{uuid.uuid4().hex}"


def now_ms() -> int:
    return int(time.time() * 1000)


# --- operations -----------------------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """What is known about one run on the caller's side, enough to (re)create it in any store."""

    local_id: str
    name: str
    parent: str | None
    """The parent's run id as given: a local id of the same tracker, an MLflow id, or None."""
    tags: dict[str, str]
    start_ms: int
    status: str | None = None
    end_ms: int | None = None
    mlflow_id: str | None = None
    """The run's id in the primary store, set by the writer when the store has answered."""
    created: threading.Event = field(default_factory=threading.Event)


@dataclass
class CreateRun:
    run: RunRecord


@dataclass
class LogBatch:
    run: RunRecord
    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)
    """(key, value, timestamp_ms, step)"""
    params: list[tuple[str, str]] = field(default_factory=list)
    tags: list[tuple[str, str]] = field(default_factory=list)

    def size(self) -> int:
        return len(self.metrics) + len(self.params) + len(self.tags)


@dataclass
class LogArtifact:
    run: RunRecord
    spooled_path: Path
    """A private link or copy of the caller's file/folder, taken at call time so the caller may delete theirs."""
    artifact_path: str | None


@dataclass
class LogText:
    run: RunRecord
    text: str
    artifact_file: str


@dataclass
class EndRun:
    run: RunRecord
    status: str
    end_ms: int


Operation = CreateRun | LogBatch | LogArtifact | LogText | EndRun


def merge_batches(batches: list[LogBatch]) -> list[LogBatch]:
    """Group consecutive log operations by run and cut them into requests within MLflow's batch limits.

    Per run, metrics keep their order; a param or tag key given twice keeps its last value (MLflow rejects a batch that
    repeats a key).
    """
    from mlflow.utils.validation import MAX_ENTITIES_PER_BATCH, MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

    by_run: dict[str, tuple[RunRecord, list, dict, dict]] = {}
    for batch in batches:
        run, metrics, params, tags = by_run.setdefault(batch.run.local_id, (batch.run, [], {}, {}))
        metrics.extend(batch.metrics)
        params.update(batch.params)
        tags.update(batch.tags)
    requests = []
    for run, metrics, params, tags in by_run.values():
        param_items, tag_items = list(params.items()), list(tags.items())
        while metrics or param_items or tag_items:
            request = LogBatch(
                run, params=param_items[:MAX_PARAMS_TAGS_PER_BATCH], tags=tag_items[:MAX_PARAMS_TAGS_PER_BATCH]
            )
            param_items, tag_items = param_items[len(request.params) :], tag_items[len(request.tags) :]
            room = min(MAX_METRICS_PER_BATCH, MAX_ENTITIES_PER_BATCH - len(request.params) - len(request.tags))
            request.metrics, metrics = metrics[:room], metrics[room:]
            requests.append(request)
    return requests


def split_batch(batch: LogBatch) -> list[LogBatch]:
    """Two halves of a rejected batch, so that the entry MLflow refuses can be found and dropped alone."""
    entries = [("m", e) for e in batch.metrics] + [("p", e) for e in batch.params] + [("t", e) for e in batch.tags]
    halves = []
    for part in (entries[: len(entries) // 2], entries[len(entries) // 2 :]):
        half = LogBatch(batch.run)
        for kind, entry in part:
            {"m": half.metrics, "p": half.params, "t": half.tags}[kind].append(entry)
        halves.append(half)
    return halves


def describe(op: Operation) -> str:
    """A short description naming keys and files but no values (values may be anything the caller logged)."""
    if isinstance(op, LogBatch):
        keys = [k for k, *_ in op.metrics] + [k for k, _ in op.params] + [k for k, _ in op.tags]
        shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        return f"log of {shown} to run {op.run.name!r}"
    if isinstance(op, LogArtifact):
        return f"artifact {op.spooled_path.name} for run {op.run.name!r}"
    if isinstance(op, LogText):
        return f"artifact {op.artifact_file} for run {op.run.name!r}"
    return f"{type(op).__name__} of run {op.run.name!r}"


def is_transient(error: BaseException) -> bool:
    """Whether retrying later may succeed (unreachable server, locked database) rather than never."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        return error.error_code not in _PERMANENT_ERROR_CODES
    if isinstance(error, (OSError, TimeoutError)):  # requests' connection errors are OSErrors
        return True
    try:
        from sqlalchemy.exc import OperationalError
    except ImportError:  # pragma: no cover - sqlalchemy comes with mlflow
        return False
    return isinstance(error, OperationalError)


def spool(local_path: Path, spool_dir: Path) -> Path:
    """A private copy of a file or folder, so that the caller may delete or rewrite theirs right away.

    A copy, not a hard link: a link shares the file's contents, and a file rewritten in place (the usual
    ``open(path, "w")``) would change what gets uploaded later.
    """
    target = spool_dir / uuid.uuid4().hex / local_path.name
    target.parent.mkdir(parents=True)
    if local_path.is_dir():
        shutil.copytree(local_path, target)
    else:
        shutil.copy2(local_path, target)
    return target
