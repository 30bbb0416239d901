"""What every launcher shares: the request ``fit`` hands over, the outcome it gets back, the worker context the loop
talks to, the run storage and the workers' logging.

The launchers themselves: :func:`robustfm.train.launchers.run_ray` (Ray Train) and
:func:`robustfm.train.local_launcher.run_local` (no Ray).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from robustfm.train.config import TrainConfig
from robustfm.train.loop import train_worker
from robustfm.train.reporting import TrackingSpec


@dataclass(frozen=True)
class LaunchRequest:
    """One training run as ``fit`` hands it to a launcher (everything but ``run_callbacks`` reaches the workers)."""

    cfg: TrainConfig
    build_task: Callable[[], Any]
    """Builds the task on every worker at every stage (picklable)."""
    source: Any
    """Each rank's batches (a :class:`~robustfm.train.task.BatchSource`, picklable)."""
    tracking: TrackingSpec
    run_name: str
    """The run's directory under ``cfg.storage_path``; the same name resumes."""
    on_stage_end: Callable[..., Any] | None = None
    on_epoch_end: Callable[..., Any] | None = None
    run_callbacks: tuple[Any, ...] = ()
    """Ray Train callbacks for the TorchTrainer's ``RunConfig`` (Ray launcher only; they stay on the driver)."""

    def run_worker(self, context: WorkerContext) -> dict[str, Any]:
        """Run (or resume) every stage on ``context``'s rank (:func:`robustfm.train.loop.train_worker`)."""
        return train_worker(
            self.cfg, self.build_task, self.source, context, self.tracking, self.on_stage_end, self.on_epoch_end
        )


@dataclass(frozen=True)
class LaunchOutcome:
    """What a launcher hands back to ``fit``: rank 0's summary and where the last checkpoint is."""

    summary: dict[str, Any]
    checkpoint_path: str
    """Path of the last checkpoint inside ``filesystem`` (a local path when it is None)."""
    filesystem: Any | None
    run_path: str


class WorkerContext(Protocol):
    """A rank as the training loop sees it: who it is, where its checkpoint comes from and goes to.

    Implemented by :class:`~robustfm.train.launchers.RayWorkerContext` and
    :class:`~robustfm.train.local_launcher.LocalWorkerContext`.
    """

    rank: int
    world_size: int
    device: torch.device
    first_attempt: bool
    """No checkpoint to resume from: the run starts fresh (``fail_at_step`` only fires then)."""
    progress: str
    """``"bar"``, ``"log"`` or ``"none"``: how this rank shows progress."""

    def restored_checkpoint_dir(self) -> Path | None:
        """A local directory holding the checkpoint to resume from (None: start fresh)."""
        ...

    def release_restored(self) -> None:
        """Free what :meth:`restored_checkpoint_dir` holds."""
        ...

    def report(self, metrics: dict[str, Any], directory: Path, name: str) -> None:
        """Hand this rank's checkpoint ``directory`` (named ``name``) to the run storage (a collective)."""
        ...

    def report_metrics(self, metrics: dict[str, Any]) -> None:
        """A metrics-only report (every rank calls it)."""
        ...

    def die(self, message: str) -> None:
        """Fault injection: end this worker as a crash would."""
        ...


def storage_filesystem(cfg: TrainConfig) -> tuple[Any | None, str]:
    """(pyarrow filesystem or None, path in it) for the run storage. An ``s3://`` path with ``storage_endpoint_url``
    gets an explicit S3 filesystem (credentials from the driver's ``AWS_*`` variables); a local path is made
    absolute (workers may run in another directory)."""
    path = cfg.storage_path
    if not path.startswith("s3://"):
        return None, os.path.abspath(os.path.expanduser(path))
    if cfg.storage_endpoint_url is None:
        return None, path
    from pyarrow import fs

    scheme, _, host = cfg.storage_endpoint_url.rpartition("://")
    s3 = fs.S3FileSystem(
        endpoint_override=host,
        scheme=scheme or "https",
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        session_token=os.environ.get("AWS_SESSION_TOKEN"),
        region=os.environ.get("AWS_DEFAULT_REGION", os.environ.get("AWS_REGION", "us-east-1")),
    )
    return s3, path[len("s3://") :]


def configure_worker_logging() -> None:
    """robustfm's INFO lines on the worker's console, once; third-party loggers at WARNING."""
    log = logging.getLogger("robustfm")
    log.setLevel(logging.INFO)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        log.addHandler(handler)
    # Ray workers give the root logger a handler of their own: propagating would print every line twice.
    log.propagate = False
    # Third-party INFO lines (open_clip's model construction, ...) would be relayed to the job's console: keep
    # warnings and errors only. robustfm's own progress has its handler above.
    logging.getLogger().setLevel(logging.WARNING)
