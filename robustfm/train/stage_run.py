"""What the training loop does between its steps: checkpoints handed to the launcher, and per-epoch validation.

Both are collectives (every rank calls them) and both are excluded from the throughput the stage reports.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from robustfm.train.checkpoint import CheckpointState, TrainPosition, checkpoint_name, write_checkpoint
from robustfm.train.config import TrainConfig
from robustfm.train.reporting import StageReporter

if TYPE_CHECKING:
    from robustfm.train.launch import WorkerContext

logger = logging.getLogger("robustfm.train")


def checkpoint_due(cfg: TrainConfig, position: TrainPosition) -> bool:
    """A periodic mid-stage checkpoint falls on the current step (stage ends always checkpoint)."""
    return bool(cfg.checkpoint_every_steps) and position.global_step % cfg.checkpoint_every_steps == 0


@dataclass(frozen=True)
class StageRun:
    """One stage in training on this rank, as its checkpoints and validations see it.

    ``position`` and ``history`` are the loop's own objects: the loop advances them, a checkpoint stores a copy.
    """

    cfg: TrainConfig
    context: WorkerContext
    stage_name: str
    position: TrainPosition
    runtime: Any
    """The strategy runtime (:class:`~robustfm.train.strategies.DDPRuntime` or ``DeepSpeedRuntime``)."""
    decision: Any
    """The strategy decision (name, ZeRO stage) the run trains with."""
    history: list[dict[str, Any]]
    reporter: StageReporter
    run: Any
    """The stage's tracked run on rank 0 (None elsewhere, or without tracking)."""

    def checkpoint(self, model_state: dict[str, torch.Tensor] | None = None) -> str:
        """Write this rank's part into a fresh local directory and hand it to the launcher (a collective).

        Args:
            model_state: the full model state when the caller already has it (the stage's end); else gathered here.

        Returns:
            The checkpoint's name.
        """
        context, position, runtime = self.context, self.position, self.runtime
        if model_state is None and (context.rank == 0 or runtime.name == "deepspeed"):
            model_state = runtime.full_state_dict()  # a collective under ZeRO-3; DDP ranks hold the same copy
        name = checkpoint_name(position)
        state = CheckpointState(
            position=TrainPosition(**vars(position)),
            stage_name=self.stage_name,
            strategy=self.decision.name,
            zero_stage=self.decision.zero_stage,
            world_size=context.world_size,
            history=list(self.history),
        )
        started, cpu_started = time.perf_counter(), time.thread_time()
        with tempfile.TemporaryDirectory(prefix="robustfm-ckpt-") as tmp:
            directory = Path(tmp) / name
            write_checkpoint(
                directory,
                context.rank,
                state,
                model_state if context.rank == 0 else None,
                None if position.stage_complete else runtime,
            )
            metrics = {"global_step": position.global_step, "stage": self.stage_name, **(self.reporter.last or {})}
            context.report(metrics, directory, name)
        self.reporter.exclude(time.perf_counter() - started, time.thread_time() - cpu_started)
        if context.rank == 0 and context.progress == "log":
            logger.info("checkpoint %s (stage %s, step %d)", name, self.stage_name, position.global_step)
        return name

    def validate_epoch(self, on_epoch_end: Callable[..., Any], epochs_done: int) -> None:
        """Rank 0 validates the current weights; then every rank reports ``{"epoch", "stage", **metrics}``.

        Args:
            on_epoch_end: ``fit``'s hook: (stage name, epochs done, full model state on CPU, last logged window).
            epochs_done: epochs finished in this run, counted over all stages.
        """
        context, stage_name = self.context, self.stage_name
        started, cpu_started = time.perf_counter(), time.thread_time()
        model_state = None
        if context.rank == 0 or self.runtime.name == "deepspeed":
            model_state = self.runtime.full_state_dict()  # a collective under ZeRO-3
        metrics: dict[str, float] = {}
        if context.rank == 0:
            returned = on_epoch_end(stage_name, epochs_done, model_state, dict(self.reporter.last or {})) or {}
            metrics = {str(k): float(v) for k, v in returned.items()}
            self.history.append({"stage": stage_name, "epoch": float(epochs_done), **metrics})
            if self.run is not None and metrics:
                self.run.log_metrics(metrics, step=self.position.global_step)
            logger.info("stage %s: epoch %d validated: %s", stage_name, epochs_done, metrics)
        del model_state
        context.report_metrics({"epoch": epochs_done, "stage": stage_name, **metrics})
        self.reporter.exclude(time.perf_counter() - started, time.thread_time() - cpu_started)
