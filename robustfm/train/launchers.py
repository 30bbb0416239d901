"""Launchers: who runs :func:`robustfm.train.loop.train_worker` and where checkpoints go.

``ray``: Ray Train V2 ``TorchTrainer`` workers (this module); checkpoints through ``ray.train.report`` into the run's
storage (local or ``s3://``), resume through ``ray.train.get_checkpoint()``, restarts from
``FailureConfig(max_failures)``.
``local``: no Ray (:mod:`robustfm.train.local_launcher`, re-exported here); one process (or ``num_workers`` processes
spawned with torch.multiprocessing), checkpoints copied into the same storage layout and resumed from the newest
complete one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from robustfm.train.launch import (
    LaunchOutcome,
    LaunchRequest,
    WorkerContext,
    configure_worker_logging,
    storage_filesystem,
)
from robustfm.train.local_launcher import (
    LocalWorkerContext,
    destroy_local_process_group,
    init_local_process_group,
    latest_checkpoint,
    list_checkpoints,
    mark_part_written,
    newest_marked_checkpoint,
    run_local,
)

__all__ = [
    "LaunchOutcome",
    "LaunchRequest",
    "LocalWorkerContext",
    "RayWorkerContext",
    "WorkerContext",
    "destroy_local_process_group",
    "init_local_process_group",
    "latest_checkpoint",
    "list_checkpoints",
    "run_local",
    "run_ray",
    "storage_filesystem",
]

logger = logging.getLogger("robustfm.train")


class RayWorkerContext:
    """Rank, device and checkpoint hand-off inside a Ray Train worker."""

    progress = "log"

    def __init__(self, resume_unregistered: bool = True) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        storage = context.get_storage()
        self._filesystem, self._run_path = storage.storage_filesystem, storage.experiment_fs_path
        registered = ray.train.get_checkpoint()
        self._checkpoint = self._resume_point(registered) if resume_unregistered else registered
        self.first_attempt = self._checkpoint is None
        self._stack = contextlib.ExitStack()

    def _resume_point(self, registered: Any) -> Any:
        """Ray Train's latest registered checkpoint, or a newer complete one found in the run storage.

        The controller registers a reported checkpoint only when it next polls the workers (every 2 s): a worker
        that dies sooner leaves a checkpoint that is whole in storage but unknown to Ray, and the restart would
        begin the run again. Every rank marks its part written (after its upload), so a checkpoint with all marks
        is complete. Not inside a Tune trial: Tune has not consumed the metrics reported since Ray's checkpoint (an
        epoch's validation), and a trial resumed past them would never report them again.
        """
        import ray.train

        found = newest_marked_checkpoint(self._filesystem, self._run_path)
        if found is None or (registered is not None and Path(registered.path).name >= Path(found).name):
            return registered
        if self.rank == 0:
            logger.warning(
                "resuming from %s: complete in storage but not registered by Ray Train (the run died before its "
                "controller polled)",
                Path(found).name,
            )
        return ray.train.Checkpoint(found, filesystem=self._filesystem)

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
        mark_part_written(self._filesystem, f"{self._run_path}/{name}", self.rank)

    def report_metrics(self, metrics: dict[str, Any]) -> None:
        import ray.train

        ray.train.report(metrics)  # every rank; a run inside a Tune trial forwards rank 0's (TuneReportCallback)

    def die(self, message: str) -> None:
        if self.rank == 0:
            logger.error("%s: killing rank 0", message)
            logging.shutdown()
            os._exit(1)


def _ray_train_loop(config: dict[str, Any]) -> dict[str, Any]:
    configure_worker_logging()
    return config["request"].run_worker(RayWorkerContext(config["resume_unregistered"]))


def run_ray(request: LaunchRequest) -> LaunchOutcome:
    """Run the stages on Ray Train workers; a run with the same storage and name resumes where it stopped.

    ``request.run_callbacks`` go to the TorchTrainer's ``RunConfig(callbacks=...)`` (e.g. Tune's
    ``TuneReportCallback``); they stay on the driver.
    """
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = request.cfg
    filesystem, storage = storage_filesystem(cfg)
    scaling = ScalingConfig(
        num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=dict(cfg.resources_per_worker) or None
    )
    run_config = RunConfig(
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # Ray Train's own INFO lines go to its logs
        name=request.run_name,
        storage_path=storage,
        storage_filesystem=filesystem,
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        callbacks=list(request.run_callbacks) or None,
    )
    # Run callbacks come from Tune (TuneReportCallback): a trial resumes only from what Ray Train registered.
    loop_config = {
        "request": dataclasses.replace(request, run_callbacks=()),
        "resume_unregistered": not request.run_callbacks,
    }
    trainer = TorchTrainer(
        _ray_train_loop, train_loop_config=loop_config, scaling_config=scaling, run_config=run_config
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"run {request.run_name} finished without a checkpoint in {storage}")
    # Result.metrics is None in Ray Train V2 unless reported with a checkpoint: the summary is rank 0's return value.
    summary = result.return_value or {}
    return LaunchOutcome(summary, result.checkpoint.path, result.checkpoint.filesystem, str(result.path))
