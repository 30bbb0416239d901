"""Launchers: who runs :func:`robustfm.train.loop.train_worker` and where checkpoints go.

``ray``: Ray Train V2 ``TorchTrainer`` workers; checkpoints through ``ray.train.report`` into the run's storage
(local or ``s3://``), resume through ``ray.train.get_checkpoint()``, restarts from ``FailureConfig(max_failures)``.
``local``: no Ray; one process (or ``num_workers`` processes spawned with torch.multiprocessing), checkpoints copied
into the same storage layout and resumed from the newest complete one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from robustfm.runtime import free_loopback_port
from robustfm.train.checkpoint import STATE_FILE
from robustfm.train.config import TrainConfig
from robustfm.train.loop import InjectedFault, train_worker
from robustfm.train.reporting import TrackingSpec

logger = logging.getLogger("robustfm.train")


@dataclass(frozen=True)
class LaunchOutcome:
    """What a launcher hands back to ``fit``: rank 0's summary and where the last checkpoint is."""

    summary: dict[str, Any]
    checkpoint_path: str
    """Path of the last checkpoint inside ``filesystem`` (a local path when it is None)."""
    filesystem: Any | None
    run_path: str


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


def _configure_worker_logging() -> None:
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


# --- Ray ------------------------------------------------------------------------------------------------------------


class RayWorkerContext:
    """Rank, device and checkpoint hand-off inside a Ray Train worker."""

    progress = "log"

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self._checkpoint = ray.train.get_checkpoint()
        self.first_attempt = self._checkpoint is None
        self._stack = contextlib.ExitStack()

    def restored_checkpoint_dir(self) -> Path | None:
        if self._checkpoint is None:
            return None
        return Path(self._stack.enter_context(self._checkpoint.as_directory()))

    def release_restored(self) -> None:
        self._stack.close()

    def report(self, metrics: dict[str, Any], directory: Path, name: str) -> None:
        import ray.train

        # Every rank hands over its own directory; Ray merges them into one checkpoint in storage.
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)), checkpoint_dir_name=name
        )

    def report_metrics(self, metrics: dict[str, Any]) -> None:
        import ray.train

        ray.train.report(metrics)  # every rank; a run inside a Tune trial forwards rank 0's (TuneReportCallback)

    def die(self, message: str) -> None:
        if self.rank == 0:
            logger.error("%s: killing rank 0", message)
            logging.shutdown()
            os._exit(1)


def _ray_train_loop(config: dict[str, Any]) -> dict[str, Any]:
    _configure_worker_logging()
    return train_worker(
        config["cfg"],
        config["build_task"],
        config["source"],
        RayWorkerContext(),
        config["tracking"],
        config["on_stage_end"],
        config["on_epoch_end"],
    )


def run_ray(
    cfg: TrainConfig,
    build_task: Callable[[], Any],
    source: Any,
    tracking: TrackingSpec,
    run_name: str,
    on_stage_end: Callable[..., Any] | None = None,
    on_epoch_end: Callable[..., Any] | None = None,
    run_callbacks: Sequence[Any] = (),
) -> LaunchOutcome:
    """Run the stages on Ray Train workers; a run with the same storage and name resumes where it stopped.

    ``run_callbacks`` go to the TorchTrainer's ``RunConfig(callbacks=...)`` (e.g. Tune's ``TuneReportCallback``).
    """
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    filesystem, storage = storage_filesystem(cfg)
    scaling = ScalingConfig(
        num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=dict(cfg.resources_per_worker) or None
    )
    run_config = RunConfig(
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # Ray Train's own INFO lines go to its logs
        name=run_name,
        storage_path=storage,
        storage_filesystem=filesystem,
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        callbacks=list(run_callbacks) or None,
    )
    loop_config = {
        "cfg": cfg,
        "build_task": build_task,
        "source": source,
        "tracking": tracking,
        "on_stage_end": on_stage_end,
        "on_epoch_end": on_epoch_end,
    }
    trainer = TorchTrainer(
        _ray_train_loop, train_loop_config=loop_config, scaling_config=scaling, run_config=run_config
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"run {run_name} finished without a checkpoint in {storage}")
    # Result.metrics is None in Ray Train V2 unless reported with a checkpoint: the summary is rank 0's return value.
    summary = result.return_value or {}
    return LaunchOutcome(summary, result.checkpoint.path, result.checkpoint.filesystem, str(result.path))


# --- local ----------------------------------------------------------------------------------------------------------


class LocalWorkerContext:
    """A rank of the local launcher: checkpoints are copied into ``run_path`` in the same layout as Ray's."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        device: torch.device,
        run_path: str,
        filesystem: Any,
        keep: int | None,
        progress: str,
    ) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device
        self.run_path, self.filesystem, self.keep, self.progress = run_path, filesystem, keep, progress
        self._latest = latest_checkpoint(filesystem, run_path)
        self.first_attempt = self._latest is None
        self._tmp: str | None = None

    def restored_checkpoint_dir(self) -> Path | None:
        if self._latest is None:
            return None
        self._tmp = tempfile.mkdtemp(prefix="robustfm-restore-")
        local = Path(self._tmp) / Path(self._latest).name
        _copy(self.filesystem, self._latest, None, str(local))
        return local

    def release_restored(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def report(self, metrics: dict[str, Any], directory: Path, name: str) -> None:
        target = f"{self.run_path}/{name}"
        state_file = directory / STATE_FILE
        held_back = None
        if state_file.exists():  # rank 0's train_state.json goes last: a checkpoint is complete once it exists
            held_back = Path(tempfile.mkdtemp()) / STATE_FILE
            shutil.move(state_file, held_back)
        _copy(None, str(directory), self.filesystem, target)
        if self.world_size > 1:
            dist.barrier()
        if held_back is not None:
            _copy(None, str(held_back), self.filesystem, f"{target}/{STATE_FILE}")
            shutil.rmtree(held_back.parent, ignore_errors=True)
            self._prune()
        if self.world_size > 1:
            dist.barrier()

    def _prune(self) -> None:
        if self.keep is None:
            return
        for old in list_checkpoints(self.filesystem, self.run_path)[: -self.keep]:
            _filesystem(self.filesystem).delete_dir(old)

    def report_metrics(self, metrics: dict[str, Any]) -> None:
        pass  # no Ray session to report to: the metrics are in the history and the tracked run

    def die(self, message: str) -> None:
        raise InjectedFault(message)


def _filesystem(filesystem: Any) -> Any:
    from pyarrow import fs

    return filesystem or fs.LocalFileSystem()


def _copy(source_fs: Any, source: str, dest_fs: Any, dest: str) -> None:
    from pyarrow import fs

    source_fs, dest_fs = _filesystem(source_fs), _filesystem(dest_fs)
    if source_fs.get_file_info(source).type == fs.FileType.File:
        dest_fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
    else:
        dest_fs.create_dir(dest, recursive=True)
    fs.copy_files(source, dest, source_filesystem=source_fs, destination_filesystem=dest_fs)


def list_checkpoints(filesystem: Any, run_path: str) -> list[str]:
    """Complete checkpoints (with ``train_state.json``) under ``run_path``, oldest first."""
    from pyarrow import fs

    pfs = _filesystem(filesystem)
    if pfs.get_file_info(run_path).type != fs.FileType.Directory:
        return []
    found = [
        info.path
        for info in pfs.get_file_info(fs.FileSelector(run_path))
        if info.type == fs.FileType.Directory and info.base_name.startswith("checkpoint_")
    ]
    complete = [p for p in found if pfs.get_file_info(f"{p}/{STATE_FILE}").type == fs.FileType.File]
    return sorted(complete)


def latest_checkpoint(filesystem: Any, run_path: str) -> str | None:
    """The newest complete checkpoint under ``run_path`` (None when there is none)."""
    found = list_checkpoints(filesystem, run_path)
    return found[-1] if found else None


def init_local_process_group(rank: int, world_size: int, port: int, use_gpu: bool) -> torch.device:
    """Join a local process group on 127.0.0.1 (gloo on CPU, NCCL on GPU) and return this rank's device."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    device = torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group(
        "nccl" if use_gpu else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        device_id=device if use_gpu else None,
    )
    return device


def destroy_local_process_group() -> None:
    """Leave the process group; when DeepSpeed used it, through DeepSpeed, whose cached groups would go stale."""
    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None and ds_comm.cdb is not None and ds_comm.cdb.is_initialized():
        ds_comm.destroy_process_group()
        ds_comm.cdb = None  # the next engine builds a backend for the next group
    else:
        dist.destroy_process_group()


def _local_rank(
    rank: int,
    world_size: int,
    port: int,
    cfg: TrainConfig,
    build_task: Callable[[], Any],
    source: Any,
    tracking: TrackingSpec,
    run_path: str,
    on_stage_end: Any,
    on_epoch_end: Any,
    summary_file: str | None,
) -> dict[str, Any]:
    if summary_file is not None:  # a spawned process: nothing configured its logging
        _configure_worker_logging()
    filesystem, _ = storage_filesystem(cfg)
    device = init_local_process_group(rank, world_size, port, cfg.use_gpu)
    try:
        context = LocalWorkerContext(
            rank,
            world_size,
            device,
            run_path,
            filesystem,
            cfg.keep_checkpoints,
            progress="bar" if rank == 0 else "none",
        )
        summary = train_worker(cfg, build_task, source, context, tracking, on_stage_end, on_epoch_end)
    finally:
        destroy_local_process_group()
    if summary_file is not None and rank == 0:
        Path(summary_file).write_text(json.dumps(summary))
    return summary


def run_local(
    cfg: TrainConfig,
    build_task: Callable[[], Any],
    source: Any,
    tracking: TrackingSpec,
    run_name: str,
    on_stage_end: Callable[..., Any] | None = None,
    on_epoch_end: Callable[..., Any] | None = None,
    run_callbacks: Sequence[Any] = (),
) -> LaunchOutcome:
    """Run the stages without Ray: in this process, or in ``num_workers`` spawned processes."""
    if run_callbacks:
        raise ValueError("run_callbacks are Ray Train callbacks: they need train.launcher 'ray'")
    filesystem, storage = storage_filesystem(cfg)
    if filesystem is None and storage.startswith("s3://"):
        from pyarrow import fs

        filesystem, storage = fs.FileSystem.from_uri(storage)
    run_path = f"{storage.rstrip('/')}/{run_name}"
    port = free_loopback_port()
    if cfg.num_workers == 1:
        summary = _local_rank(0, 1, port, cfg, build_task, source, tracking, run_path, on_stage_end, on_epoch_end, None)
    else:
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as tmp:
            summary_file = f"{tmp}/summary.json"
            mp.spawn(
                _local_rank,
                nprocs=cfg.num_workers,
                args=(
                    cfg.num_workers,
                    port,
                    cfg,
                    build_task,
                    source,
                    tracking,
                    run_path,
                    on_stage_end,
                    on_epoch_end,
                    summary_file,
                ),
            )
            summary = json.loads(Path(summary_file).read_text())
    checkpoint = latest_checkpoint(filesystem, run_path)
    if checkpoint is None:
        raise RuntimeError(f"run {run_name} finished without a checkpoint in {run_path}")
    return LaunchOutcome(summary, checkpoint, filesystem, run_path)
