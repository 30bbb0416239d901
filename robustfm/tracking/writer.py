"""The background side of :mod:`robustfm.tracking`: an MLflow sink, the writer thread, and the fallback replay.

The caller only appends operations (:mod:`robustfm.tracking.ops`) to an ordered queue; one writer thread per tracker
applies them to MLflow. A failure that may pass (server down, database locked) keeps the operation at the head of the
queue and is retried with backoff, so nothing is reordered or lost; a failure that cannot pass (a rejected value) drops
only the offending entries. What is still unwritten when the tracker closes is replayed into a local SQLite fallback
store by :func:`replay_into_fallback`.

mlflow is imported here only inside functions that run on the writer thread (or at close), never at import time.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from robustfm.tracking.ops import (
    LOCAL_ID_PREFIX,
    EndRun,
    LogArtifact,
    LogBatch,
    LogText,
    Operation,
    RunRecord,
    describe,
    is_transient,
    merge_batches,
    redact,
    split_batch,
)

logger = logging.getLogger("robustfm.tracking")
_MAX_ENTRIES_PER_TAKE = 5000  # how many queued log entries one writer step merges into batched requests


# --- one MLflow store -----------------------------------------------------------------------------------------------


def artifact_location_for(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside its database; a server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        db_path = uri[len("sqlite:///") :].split("?", 1)[0]
        return str(Path(db_path).parent / "artifacts")
    return None


class MlflowSink:
    """Applies operations to one MLflow store, creating the experiment and runs there on first use.

    Args:
        uri: the store's tracking URI.
        experiment: experiment name, created when missing.
        runs: every run of the tracker by local id (shared, read-only here), to resolve local parent ids.
        primary: True for the tracker's own store (it publishes MLflow ids to the run handles); False for the fallback
            store, whose runs are tagged as replays of what the primary store did not receive.
    """

    def __init__(self, uri: str, experiment: str, runs: dict[str, RunRecord], primary: bool) -> None:
        from mlflow import MlflowClient

        self.uri = uri
        self.experiment = experiment
        self.runs = runs
        self.primary = primary
        self.client = MlflowClient(tracking_uri=uri)
        self.ids: dict[str, str] = {}
        self.ended: set[str] = set()
        self._experiment_id: str | None = None

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment, artifact_location=artifact_location_for(self.uri)
                    )
                except Exception:  # another process created it first: use theirs
                    found = self.client.get_experiment_by_name(self.experiment)
                    if found is None:
                        raise
            if found is not None:
                self._experiment_id = found.experiment_id
        return self._experiment_id

    def ensure_run(self, run: RunRecord) -> str:
        """The run's id in this store, creating the run (and its local parents) here when needed."""
        if run.local_id in self.ids:
            return self.ids[run.local_id]
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        tags = dict(run.tags)
        tags["robustfm.local_run_id"] = run.local_id
        parent = run.parent
        if parent is not None and parent in self.runs:
            tags[MLFLOW_PARENT_RUN_ID] = self.ensure_run(self.runs[parent])
        elif parent is not None and parent.startswith(LOCAL_ID_PREFIX):  # another process's run that never got an id
            tags["robustfm.parent_local_run_id"] = parent
        elif parent is not None:
            tags[MLFLOW_PARENT_RUN_ID if self.primary else "robustfm.primary_parent_run_id"] = parent
        if not self.primary:
            tags["robustfm.fallback"] = "true"
            if run.mlflow_id is not None:
                tags["robustfm.primary_run_id"] = run.mlflow_id
        created = self.client.create_run(self.experiment_id(), start_time=run.start_ms, tags=tags, run_name=run.name)
        self.ids[run.local_id] = created.info.run_id
        if self.primary:
            run.mlflow_id = created.info.run_id
            run.created.set()
        return created.info.run_id

    def apply(self, op: Operation) -> None:
        run_id = self.ensure_run(op.run)
        if isinstance(op, LogBatch):
            self._log_batch(run_id, op)
        elif isinstance(op, LogArtifact):
            if op.spooled_path.is_dir():
                self.client.log_artifacts(run_id, str(op.spooled_path), op.artifact_path)
            else:
                self.client.log_artifact(run_id, str(op.spooled_path), op.artifact_path)
            shutil.rmtree(op.spooled_path.parent, ignore_errors=True)
        elif isinstance(op, LogText):
            self.client.log_text(run_id, op.text, op.artifact_file)
        elif isinstance(op, EndRun):
            self.client.set_terminated(run_id, status=op.status, end_time=op.end_ms)
            self.ended.add(op.run.local_id)

    def _log_batch(self, run_id: str, op: LogBatch) -> None:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

        self.client.log_batch(
            run_id,
            metrics=[Metric(k, v, ts, step) for k, v, ts, step in op.metrics],
            params=[Param(k, v[:MAX_PARAM_VAL_LENGTH]) for k, v in op.params],
            tags=[RunTag(k, v[:MAX_TAG_VAL_LENGTH]) for k, v in op.tags],
            synchronous=True,
        )

    def end_unfinished(self) -> None:
        """Close runs this store created but never saw end (parents replayed only to hold their children)."""
        for local_id, run_id in self.ids.items():
            if local_id not in self.ended:
                record = self.runs[local_id]
                self.client.set_terminated(run_id, status=record.status or "FINISHED", end_time=record.end_ms)
                self.ended.add(local_id)


# --- the writer thread ----------------------------------------------------------------------------------------------


class Writer:
    """One background thread applying queued operations, in order, to the primary store.

    Args:
        make_sink: builds the primary :class:`MlflowSink` (called on the writer thread: it imports mlflow).
        uri_for_messages: the store URI as shown in warnings (credentials already redacted).
    """

    def __init__(self, make_sink: Callable[[], MlflowSink], uri_for_messages: str) -> None:
        self._make_sink = make_sink
        self._uri = uri_for_messages
        self._cond = threading.Condition()
        self._queue: deque[Operation] = deque()
        self._inflight: deque[Operation] = deque()  # taken from the queue (merged), not yet written
        self._busy = False
        self._stop = False
        self.offline = False
        self._warned = False
        self._thread = threading.Thread(target=self._loop, name="robustfm-tracking-writer", daemon=True)
        self._thread.start()

    def put(self, op: Operation) -> None:
        with self._cond:
            self._queue.append(op)
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + len(self._inflight)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every queued operation is written; False when ``timeout_s`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not (self._queue or self._inflight or self._busy), timeout=timeout_s)

    def stop(self, join_timeout_s: float) -> list[Operation]:
        """Stop the thread and return what it did not write, in order (to be replayed elsewhere)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        # The thread finishes the request in flight (bounded by the HTTP timeout set for this client) before it stops.
        self._thread.join(timeout=join_timeout_s)
        with self._cond:
            left = list(self._inflight) + list(self._queue)
            self._inflight.clear()
            self._queue.clear()
            return left

    def _take(self) -> None:
        """Move the next operation(s) from the queue to in-flight; consecutive log calls merge into few requests."""
        if not isinstance(self._queue[0], LogBatch):
            self._inflight.append(self._queue.popleft())
            return
        batches, entries = [], 0
        while self._queue and isinstance(self._queue[0], LogBatch) and entries < _MAX_ENTRIES_PER_TAKE:
            batches.append(self._queue.popleft())
            entries += batches[-1].size()
        self._inflight.extend(merge_batches(batches))

    def _loop(self) -> None:
        sink: MlflowSink | None = None
        backoff_s = 0.5
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._stop or self._queue or self._inflight)
                if self._stop:
                    return
                if not self._inflight:
                    self._take()
                op = self._inflight[0]
                self._busy = True
            store_ready = False
            try:
                sink = sink or self._make_sink()
                sink.experiment_id()  # cached after the first success
                store_ready = True
                sink.apply(op)
            except Exception as error:  # noqa: BLE001 - every failure is either retried or reported, never raised
                # Until the store has answered once (bad URI, server down, no mlflow), every failure is the store's,
                # not the operation's: keep everything for later or for the fallback store.
                if not store_ready or is_transient(error):
                    self.went_offline(error)
                    with self._cond:
                        self._busy = False
                        self._cond.wait_for(lambda: self._stop, timeout=backoff_s)
                    backoff_s = min(backoff_s * 2, 5.0)
                    continue
                replacement = split_batch(op) if isinstance(op, LogBatch) and op.size() > 1 else []
                if replacement:  # bisect until the refused entry is alone; the others are written
                    logger.debug("MLflow rejected a batch of %d entries; retrying it in halves", op.size())
                else:
                    logger.warning("MLflow rejected the %s; dropping it: %s", describe(op), redact(str(error))[:500])
                with self._cond:
                    if self._inflight and self._inflight[0] is op:  # stop() may have taken it for the fallback
                        self._inflight.popleft()
                        self._inflight.extendleft(reversed(replacement))
                continue
            backoff_s = 0.5
            with self._cond:
                if self._inflight and self._inflight[0] is op:
                    self._inflight.popleft()
            if self.offline:
                self.offline = False
                logger.info("MLflow tracking store %s answers again; writing the buffered logs", self._uri)

    def went_offline(self, error: BaseException) -> None:
        """Note that the store does not answer (warned once per tracker); cleared by the next successful write."""
        self.offline = True
        with self._cond:  # run_id (caller thread) reports hung stores too: still one warning
            first, self._warned = not self._warned, True
        if first:
            logger.warning(
                "MLflow tracking store %s cannot be reached (%s: %s). Training goes on; logs are buffered and written "
                "when it answers again, or into a local fallback store when the tracker closes.",
                self._uri,
                type(error).__name__,
                redact(str(error))[:300],
            )
        else:
            logger.debug("MLflow tracking store %s still unreachable: %s", self._uri, redact(str(error))[:300])


def replay_into_fallback(ops: list[Operation], fallback_dir: Path, experiment: str, runs: dict[str, RunRecord]) -> str:
    """Write ``ops`` (in order) into a local SQLite store under ``fallback_dir``; returns that store's URI."""
    fallback_dir.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{(fallback_dir / 'mlflow.db').resolve()}"
    sink = MlflowSink(uri, experiment, runs, primary=False)
    merged: list[Operation | list[LogBatch]] = []
    for op in ops:  # consecutive log calls become few batched writes, as on the writer thread
        if isinstance(op, LogBatch) and merged and isinstance(merged[-1], list):
            merged[-1].append(op)
        else:
            merged.append([op] if isinstance(op, LogBatch) else op)
    ops = [request for item in merged for request in (merge_batches(item) if isinstance(item, list) else [item])]
    for op in ops:
        for attempt in range(5):  # other processes may be replaying into the same SQLite file right now
            try:
                sink.apply(op)
                break
            except Exception as error:  # noqa: BLE001
                if attempt == 4 or not is_transient(error):
                    logger.error("Could not write the %s to the fallback store %s: %s", describe(op), uri, error)
                    break
                time.sleep(0.2 * (attempt + 1))
    sink.end_unfinished()
    return uri
