"""The training loop every worker runs: stages, per-stage optimizer, schedule, loss weighting, checkpoints, resume.

Launcher-agnostic: a :class:`robustfm.train.launch.WorkerContext` gives the rank, device, the checkpoint to
resume from and a way to report checkpoints (Ray Train or a local directory).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from robustfm.config import ConfigError
from robustfm.seeding import epoch_seed
from robustfm.train.checkpoint import (
    MODEL_FILE,
    TrainPosition,
    checkpoint_name,
    load_model_state,
    read_state,
    restore_rng,
)
from robustfm.train.config import StageConfig, TrainConfig
from robustfm.train.reporting import StageReporter, TrackingSpec
from robustfm.train.stage_run import StageRun, checkpoint_due
from robustfm.train.strategies import DDPRuntime, DeepSpeedRuntime, build_optimizer, decide_strategy
from robustfm.train.task import (
    BatchSource,
    RunBatches,
    StageSpec,
    Task,
    batch_size_of,
    check_param_groups,
    stage_batches,
)

if TYPE_CHECKING:
    from robustfm.train.launch import WorkerContext

logger = logging.getLogger("robustfm.train")


class InjectedFault(RuntimeError):
    """Raised (local launcher) where ``fail_at_step`` kills a worker."""


def learning_rate(peak: float, step: int, total_steps: int, stage: StageConfig, epoch: int = 0) -> float:
    """Linear warmup over ``warmup_steps``, then cosine to ``min_lr_ratio * peak`` at ``total_steps``, constant, or
    decayed by ``step_gamma`` every ``step_every_epochs`` epochs (``epoch``: within the stage)."""
    if step < stage.warmup_steps:
        return peak * (step + 1) / stage.warmup_steps
    if stage.schedule == "constant":
        return peak
    if stage.schedule == "step":
        return peak * stage.step_gamma ** (epoch // stage.step_every_epochs)
    progress = min(1.0, (step - stage.warmup_steps) / max(1, total_steps - stage.warmup_steps))
    return peak * (stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def check_stage_groups(cfg: TrainConfig, groups: dict[str, Any]) -> None:
    """Every stage may only train groups the task has (raises ConfigError naming the stage)."""
    for name, stage in cfg.stages.items():
        unknown = [g for g in stage.trainable if g not in groups]
        if unknown:
            raise ConfigError(
                f"stages.{name}.trainable", f"unknown parameter groups {unknown}; the task has {sorted(groups)}"
            )


def run_needs(cfg: TrainConfig, task: Task) -> frozenset[str]:
    """The capabilities ``task`` needs over all stages of ``cfg`` (the run keeps one strategy throughout).

    Configures the task for every stage in turn, so a stage's settings are checked here too; the engine configures
    it again before training each stage.
    """
    needs: set[str] = set()
    for name, stage in cfg.stages.items():
        task.configure_stage(StageSpec(name, stage))
        needs |= set(task.needs)
    return frozenset(needs)


def batches_per_epoch(
    cfg: TrainConfig, stage: StageConfig, source: BatchSource, epoch: int, rank: int, world_size: int
) -> int:
    """Micro-batches used per epoch: whole optimizer steps only, capped by ``max_batches_per_epoch``."""
    available = source.num_batches(epoch, rank, world_size)
    if available is None and stage.max_batches_per_epoch is None:
        raise ValueError("the batch source does not know its length: set the stage's max_batches_per_epoch")
    usable = min(x for x in (available, stage.max_batches_per_epoch) if x is not None)
    usable -= usable % cfg.grad_accum_steps
    if usable < cfg.grad_accum_steps:
        raise ValueError(
            f"epoch {epoch} has {available} batches per rank, fewer than one optimizer step "
            f"(grad_accum_steps={cfg.grad_accum_steps})"
        )
    return usable


def train_worker(
    cfg: TrainConfig,
    build_task: Callable[[], Task],
    source: RunBatches,
    context: WorkerContext,
    tracking: TrackingSpec,
    on_stage_end: Callable[..., Any] | None = None,
    on_epoch_end: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Run (or resume) every stage of ``cfg`` on this rank.

    ``on_epoch_end`` (optional; see :func:`robustfm.train.fit`) validates on rank 0 after every epoch; its metrics
    go into the history, the stage's tracked run and a metrics-only report that every rank makes (Ray Train V2 needs
    each rank to call ``report``), which a Tune trial sees.

    Returns:
        Final metrics (rank 0's are the run's): ``global_step``, ``samples_seen``, ``strategy``, ``zero_stage``, the
        last logged window per stage (``<stage>/loss/total`` ...), ``history`` (every logged record of the run) and
        ``checkpoint`` (name of the last checkpoint).
    """
    rank, world_size, device = context.rank, context.world_size, context.device
    stages = list(cfg.stages.items())
    restored = context.restored_checkpoint_dir()
    state = read_state(restored) if restored is not None else None
    carry = load_model_state(restored / MODEL_FILE) if restored is not None else None
    if state is not None and not state.position.stage_complete and state.world_size != world_size:
        raise ValueError(
            f"checkpoint {restored} was taken mid-stage with {state.world_size} workers; resume it with "
            f"the same number (now {world_size}), or from a stage-end checkpoint"
        )
    position = state.position if state is not None else TrainPosition()
    history: list[dict[str, Any]] = list(state.history) if state is not None else []

    torch.manual_seed(cfg.seed)
    task = build_task()
    groups = task.param_groups()
    check_param_groups(groups, task)
    check_stage_groups(cfg, groups)
    total_params = sum(p.numel() for p in task.parameters())
    max_trainable = max(sum(p.numel() for g in s.trainable for p in groups[g]) for s in cfg.stages.values())
    decision = decide_strategy(cfg, total_params, max_trainable, world_size, device, run_needs(cfg, task))
    if state is not None and not position.stage_complete and state.strategy != decision.name:
        raise ValueError(
            f"checkpoint {restored} was taken mid-stage with {state.strategy}, this run uses {decision.name}"
        )
    if rank == 0:
        logger.info(
            "strategy %s%s (%s); %d parameters, at most %d trainable",
            decision.name,
            f" ZeRO-{decision.zero_stage}" if decision.name == "deepspeed" else "",
            decision.reason,
            total_params,
            max_trainable,
        )

    tracker = tracking.create_tracker() if rank == 0 else None
    summary: dict[str, Any] = {}
    first_stage = position.stage_index + (1 if position.stage_complete else 0)
    last_name = checkpoint_name(position) if state is not None else None
    try:
        for stage_index in range(first_stage, len(stages)):
            stage_name, stage = stages[stage_index]
            resume_mid = state is not None and position.stage_index == stage_index and not position.stage_complete
            if not resume_mid:
                position = TrainPosition(
                    stage_index=stage_index, global_step=position.global_step, samples_seen=position.samples_seen
                )
            if task is None:
                torch.manual_seed(cfg.seed)
                task = build_task()
            if carry is not None:
                task.load_state_dict(carry)
            run = None
            if tracker is not None:
                tags = {"stage": stage_name, "strategy": decision.name, "resumed_at_step": position.global_step}
                run = tracker.start_run(
                    f"{tracking.run_name}/{stage_name}", parent_run_id=tracking.parent_run_id, tags=tags
                )
                run.log_params(
                    {
                        "stage": stage_name,
                        "strategy": decision.name,
                        "zero_stage": decision.zero_stage,
                        "strategy_reason": decision.reason,
                        "world_size": world_size,
                        **_stage_params(stage),
                    }
                )
            try:
                carry, last_name = _run_stage(
                    cfg,
                    stage_name,
                    stage,
                    task,
                    stage_batches(source, stage_name),
                    context,
                    decision,
                    position,
                    restored if resume_mid else None,
                    history,
                    run,
                    on_epoch_end,
                )
            except BaseException:
                if run is not None:
                    run.end("FAILED")
                raise
            if on_stage_end is not None and rank == 0:
                extra = on_stage_end(stage_name, carry, dict(history[-1]) if history else {}) or {}
                summary.update({f"{stage_name}/{k}": v for k, v in extra.items()})
                if run is not None and extra:
                    run.log_metrics(extra, step=position.global_step)
            if run is not None:
                run.end()
            task, restored, state = None, None, None
    finally:
        context.release_restored()
        if tracker is not None:
            tracker.close()
    for record in history:  # the last window of every stage, including stages finished before a restart
        summary.update({f"{record['stage']}/{k}": v for k, v in record.items() if k != "stage"})
    summary.update(
        {
            "global_step": position.global_step,
            "samples_seen": position.samples_seen,
            "strategy": decision.name,
            "zero_stage": decision.zero_stage,
            "history": history,
            "checkpoint": last_name,
        }
    )
    return summary


def _stage_params(stage: StageConfig) -> dict[str, Any]:
    return {
        "epochs": stage.epochs,
        "trainable": ",".join(stage.trainable),
        "warmup_steps": stage.warmup_steps,
        "schedule": stage.schedule,
        **{f"lr.{g}": v for g, v in stage.lr.items()},
        **{f"loss_weight.{n}": w for n, w in stage.loss_weights.items()},
        **{f"setting.{k}": v for k, v in stage.settings.items()},
    }


def _run_stage(
    cfg: TrainConfig,
    stage_name: str,
    stage: StageConfig,
    task: Any,
    source: BatchSource,
    context: WorkerContext,
    decision: Any,
    position: TrainPosition,
    restored: Path | None,
    history: list[dict[str, Any]],
    run: Any,
    on_epoch_end: Callable[..., Any] | None = None,
) -> tuple[dict[str, torch.Tensor], str]:
    """Train one stage from ``position`` (updated in place); returns the final full state and last checkpoint name."""
    rank, world_size, device = context.rank, context.world_size, context.device
    groups = task.param_groups()
    trainable_ids = {id(p) for g in stage.trainable for p in groups[g]}
    for param in task.parameters():
        param.requires_grad_(id(param) in trainable_ids)
    task.configure_stage(StageSpec(stage_name, stage))
    task.to(device)
    optimizer, group_names, peak_lrs = build_optimizer(cfg.optimizer, groups, stage, device)
    if decision.name == "deepspeed":
        runtime: Any = DeepSpeedRuntime(task, optimizer, cfg, device, decision.zero_stage)
    else:
        runtime = DDPRuntime(task, optimizer, cfg, device, world_size)
    if restored is not None:
        runtime.load(restored)
        restore_rng(restored, rank)

    epochs_before = sum(s.epochs for s in list(cfg.stages.values())[: position.stage_index])
    per_epoch = [
        batches_per_epoch(cfg, stage, source, epochs_before + e, rank, world_size) for e in range(stage.epochs)
    ]
    total_steps = sum(n // cfg.grad_accum_steps for n in per_epoch)
    reporter = StageReporter(
        stage_name,
        total_steps,
        position.stage_step,
        group_names,
        rank,
        world_size,
        device,
        run,
        context.progress,
        cfg.log_every_steps,
    )
    stage_run = StageRun(cfg, context, stage_name, position, runtime, decision, history, reporter, run)
    accum = cfg.grad_accum_steps
    lrs = peak_lrs
    last_name = ""
    checkpointed_step = -1
    try:
        while position.epoch < stage.epochs:
            usable = per_epoch[position.epoch]
            if position.batches_done == 0:
                # A fresh, rank-specific stream per (stage, epoch): dropout etc. never depend on what ran before.
                torch.manual_seed(epoch_seed(cfg.seed + rank, epochs_before + position.epoch, "train"))
            skip = position.batches_done
            batches = source.batches(epochs_before + position.epoch, rank, world_size, skip)
            step_samples = 0
            for index, batch in zip(range(skip, usable), batches, strict=False):
                if index % accum == 0:
                    lrs = [
                        learning_rate(peak, position.stage_step, total_steps, stage, position.epoch)
                        for peak in peak_lrs
                    ]
                    runtime.set_learning_rates(lrs)
                boundary = (index + 1) % accum == 0
                losses, grad_norm = runtime.micro_step(batch, stage.loss_weights, boundary)
                step_samples += batch_size_of(batch)
                position.batches_done = index + 1
                if not boundary:
                    continue
                task.after_optimizer_step()
                position.stage_step += 1
                position.global_step += 1
                position.samples_seen += step_samples * world_size
                reporter.add_step(losses, step_samples)
                step_samples = 0
                stage_done = position.stage_step == total_steps
                record = reporter.maybe_emit(
                    position.stage_step, position.global_step, lrs, grad_norm, force=stage_done
                )
                if record is not None:
                    history.append({"stage": stage_name, **record})
                if cfg.fail_at_step == position.global_step and context.first_attempt:
                    context.die(f"fault injected after step {position.global_step}")
                # A checkpoint due on an epoch's last step waits until the epoch is closed and validated (below):
                # a run resumed from it then starts the next epoch instead of validating this one a second time.
                if checkpoint_due(cfg, position) and position.batches_done < usable and not stage_done:
                    last_name = stage_run.checkpoint()
                    checkpointed_step = position.global_step
            if position.batches_done < usable:
                raise RuntimeError(
                    f"the batch source yielded {position.batches_done} of {usable} batches in epoch "
                    f"{epochs_before + position.epoch} on rank {rank}"
                )
            position.epoch += 1
            position.batches_done = 0
            if on_epoch_end is not None:
                stage_run.validate_epoch(on_epoch_end, epochs_before + position.epoch)
            due = checkpoint_due(cfg, position) and checkpointed_step != position.global_step
            if due and position.epoch < stage.epochs:
                last_name = stage_run.checkpoint()
        position.stage_complete = True
        final_state = runtime.full_state_dict()
        last_name = stage_run.checkpoint(final_state)
    finally:
        reporter.close()
        runtime.close()
    return final_state, last_name
