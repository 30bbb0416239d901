"""``fit``: train a task through its stages with the configured launcher and strategy; the one public entry point."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from robustfm.train.capabilities import check_capabilities
from robustfm.train.checkpoint import MODEL_FILE, load_model_state
from robustfm.train.config import TrainConfig
from robustfm.train.launch import LaunchRequest
from robustfm.train.launchers import run_local, run_ray
from robustfm.train.loop import check_stage_groups, run_needs
from robustfm.train.reporting import TrackingSpec
from robustfm.train.task import RunBatches, Task, check_param_groups, check_run_batches

logger = logging.getLogger("robustfm.train")


@dataclass(frozen=True)
class TrainResult:
    """Where a finished run left its model, and its final metrics."""

    checkpoint_path: str
    """The last checkpoint (a directory; ``s3://...`` on S3). Its layout: :mod:`robustfm.train.checkpoint`."""
    export_path: str
    """The trained task's full state as safetensors (``<checkpoint_path>/model.safetensors``)."""
    metrics: dict[str, Any]
    """Rank 0's final metrics: ``global_step``, ``samples_seen``, ``strategy``, ``zero_stage``, the last logged
    window of each stage (``<stage>/loss/total``, ``<stage>/samples_per_s`` ...)."""
    history: tuple[dict[str, Any], ...]
    """Every logged window of the run, in order (survives restarts: it is kept in the checkpoints)."""
    run_path: str
    """The run's directory in storage."""
    filesystem: Any = field(default=None, repr=False, compare=False)
    """pyarrow filesystem of the paths (None: local paths)."""

    def load_state_dict(self) -> dict[str, torch.Tensor]:
        """The exported model's state_dict on CPU (downloaded first when the storage is remote)."""
        if self.filesystem is None:
            return load_model_state(self.export_path.removeprefix("file://"))
        import tempfile

        from pyarrow import fs

        with tempfile.TemporaryDirectory() as tmp:
            fs.copy_files(
                self._path_in_filesystem(f"{self.checkpoint_path}/{MODEL_FILE}"),
                f"{tmp}/{MODEL_FILE}",
                source_filesystem=self.filesystem,
            )
            return load_model_state(f"{tmp}/{MODEL_FILE}")

    @staticmethod
    def _path_in_filesystem(path: str) -> str:
        return path.split("://", 1)[1] if "://" in path else path


def fit(
    train_cfg: TrainConfig,
    build_task: Callable[[], Task],
    batches: RunBatches,
    *,
    tracking_uri: str | None = None,
    experiment: str = "robustfm",
    parent_run_id: str | None = None,
    run_name: str = "train",
    on_stage_end: Callable[[str, dict[str, torch.Tensor], dict[str, Any]], dict[str, float] | None] | None = None,
    on_epoch_end: Callable[[str, int, dict[str, torch.Tensor], dict[str, Any]], dict[str, float] | None] | None = None,
    run_callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Train ``build_task()`` through ``train_cfg.stages``; resume if ``run_name`` already has checkpoints.

    Args:
        train_cfg: a validated :class:`TrainConfig` (config errors were raised when it was loaded).
        build_task: builds the task; called on every worker at every stage (picklable, deterministic given the
            torch seed the engine sets). It is also called once here, before any worker starts, to check the stages'
            parameter groups and settings and that the strategy provides what the task ``needs``.
        batches: each rank's batches (picklable): one source for every stage, or ``{stage: source}``. A source's
            epochs are counted over the whole run (a stage after a 3-epoch stage starts at epoch 3).
        tracking_uri: MLflow URI from ``robustfm.tracking.resolve_tracking_uri`` (None: no tracking).
        experiment: MLflow experiment. parent_run_id: the run the per-stage runs nest under.
        run_name: the run's directory under ``storage_path``, and the prefix of the stage runs' names. The same name
            on the same storage resumes from that run's latest checkpoint.
        on_stage_end: called on rank 0 after each stage with (stage name, full model state on CPU, the stage's
            last metrics); the metrics it returns are logged to the stage's run and added to the result. It runs
            inside the worker, so it must pickle.
        on_epoch_end: validation after every epoch, on rank 0: called with (stage name, epochs done in this run
            counted over all stages, full model state on CPU, the stage's last logged window); the metrics it
            returns go into ``history``, the stage's tracked run, and a metrics-only ``ray.train.report`` that every
            rank makes (``{"epoch": n, "stage": name, **metrics}``), so that a Tune trial running this fit sees a
            result per epoch. Must pickle; None: no per-epoch validation and no extra reports.
        run_callbacks: Ray Train V2 callbacks for the TorchTrainer's ``RunConfig`` (e.g.
            ``ray.tune.integration.ray_train.TuneReportCallback`` inside a Tune trial). Ray launcher only.

    Returns:
        The last checkpoint, the exported safetensors and the final metrics.

    Raises:
        ConfigError: before any worker starts, for a stage that trains an unknown parameter group, a stage setting
            the task does not have, or a strategy that lacks a capability the task needs in some stage.
    """
    probe = build_task()
    groups = probe.param_groups()
    check_param_groups(groups, probe)
    check_stage_groups(train_cfg, groups)
    check_run_batches(batches, train_cfg.stages)
    # Every stage's settings reach the task once here, and the strategy must provide what any stage needs: both fail
    # now rather than in every worker after the launch.
    check_capabilities(train_cfg, run_needs(train_cfg, probe))
    del probe, groups
    tracking = TrackingSpec(uri=tracking_uri, experiment=experiment, parent_run_id=parent_run_id, run_name=run_name)
    request = LaunchRequest(
        train_cfg, build_task, batches, tracking, run_name, on_stage_end, on_epoch_end, tuple(run_callbacks)
    )
    launch = run_ray if train_cfg.launcher == "ray" else run_local
    logger.info(
        "training %s: %d stage(s) %s, launcher %s, %d worker(s), strategy %s",
        run_name,
        len(train_cfg.stages),
        list(train_cfg.stages),
        train_cfg.launcher,
        train_cfg.num_workers,
        train_cfg.strategy.name,
    )
    outcome = launch(request)
    summary = dict(outcome.summary)
    history = tuple(summary.pop("history", ()))
    checkpoint = outcome.checkpoint_path
    if outcome.filesystem is not None and outcome.filesystem.type_name == "s3":
        checkpoint = f"s3://{checkpoint}"
    logger.info(
        "trained %s: %s steps with %s, last checkpoint %s",
        run_name,
        summary.get("global_step"),
        summary.get("strategy"),
        checkpoint,
    )
    return TrainResult(
        checkpoint_path=checkpoint,
        export_path=f"{checkpoint}/{MODEL_FILE}",
        metrics=summary,
        history=history,
        run_path=outcome.run_path,
        filesystem=outcome.filesystem,
    )
