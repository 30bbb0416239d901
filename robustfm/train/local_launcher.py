"""The local launcher: no Ray; one process, or ``num_workers`` processes spawned with torch.multiprocessing.

Checkpoints are copied into the run storage in the same layout as Ray Train's (``<storage>/<run>/checkpoint_*``), and a
run resumes from the newest complete one (a checkpoint is complete once rank 0's ``train_state.json`` is in it).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from robustfm.runtime import free_loopback_port
from robustfm.train.checkpoint import STATE_FILE
from robustfm.train.launch import LaunchOutcome, LaunchRequest, configure_worker_logging, storage_filesystem
from robustfm.train.loop import InjectedFault


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


PARTS_DIR = "parts_written"
"""Inside a checkpoint written through Ray Train: an empty file per rank, written once that rank's upload returned."""


def mark_part_written(filesystem: Any, checkpoint_path: str, rank: int) -> None:
    """Record in storage that ``rank`` has uploaded its part of the checkpoint at ``checkpoint_path``."""
    pfs = _filesystem(filesystem)
    pfs.create_dir(f"{checkpoint_path}/{PARTS_DIR}", recursive=True)
    with pfs.open_output_stream(f"{checkpoint_path}/{PARTS_DIR}/rank_{rank:05d}"):
        pass


def newest_marked_checkpoint(filesystem: Any, run_path: str) -> str | None:
    """The newest checkpoint under ``run_path`` whose every rank marked its part written (None: none is)."""
    from pyarrow import fs

    pfs = _filesystem(filesystem)
    for path in reversed(list_checkpoints(filesystem, run_path)):
        with pfs.open_input_stream(f"{path}/{STATE_FILE}") as stream:
            world_size = int(json.loads(stream.read())["world_size"])
        parts = pfs.get_file_info(fs.FileSelector(f"{path}/{PARTS_DIR}", allow_not_found=True))
        if len({info.base_name for info in parts}) >= world_size:
            return path
    return None


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
    rank: int, world_size: int, port: int, request: LaunchRequest, run_path: str, summary_file: str | None
) -> dict[str, Any]:
    if summary_file is not None:  # a spawned process: nothing configured its logging
        configure_worker_logging()
    cfg = request.cfg
    filesystem, _ = storage_filesystem(cfg)
    device = init_local_process_group(rank, world_size, port, cfg.use_gpu)
    try:
        progress = "bar" if rank == 0 else "none"
        context = LocalWorkerContext(rank, world_size, device, run_path, filesystem, cfg.keep_checkpoints, progress)
        summary = request.run_worker(context)
    finally:
        destroy_local_process_group()
    if summary_file is not None and rank == 0:
        Path(summary_file).write_text(json.dumps(summary))
    return summary


def run_local(request: LaunchRequest) -> LaunchOutcome:
    """Run the stages without Ray: in this process, or in ``num_workers`` spawned processes."""
    if request.run_callbacks:
        raise ValueError("run_callbacks are Ray Train callbacks: they need train.launcher 'ray'")
    cfg = request.cfg
    filesystem, storage = storage_filesystem(cfg)
    if filesystem is None and storage.startswith("s3://"):
        from pyarrow import fs

        filesystem, storage = fs.FileSystem.from_uri(storage)
    run_path = f"{storage.rstrip('/')}/{request.run_name}"
    port = free_loopback_port()
    if cfg.num_workers == 1:
        summary = _local_rank(0, 1, port, request, run_path, None)
    else:
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as tmp:
            summary_file = f"{tmp}/summary.json"
            mp.spawn(_local_rank, nprocs=cfg.num_workers, args=(cfg.num_workers, port, request, run_path, summary_file))
            summary = json.loads(Path(summary_file).read_text())
    checkpoint = latest_checkpoint(filesystem, run_path)
    if checkpoint is None:
        raise RuntimeError(f"run {request.run_name} finished without a checkpoint in {run_path}")
    return LaunchOutcome(summary, checkpoint, filesystem, run_path)
