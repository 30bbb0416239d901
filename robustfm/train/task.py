"""What a method gives the engine: a task (model + losses) and a source of batches.

The engine owns everything else: workers, strategy, stages, optimizer, schedule, checkpoints and metrics. Model code
never mentions rank or world size; the batch source is the only part that knows which rank reads what.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

from robustfm.config import ConfigError, replace_path
from robustfm.train.config import StageConfig

ConfigT = TypeVar("ConfigT")


@dataclass(frozen=True)
class StageSpec:
    """What a task is told before a stage: its name, its config, and the losses and settings that follow from it."""

    name: str
    """The stage's name (a key of ``TrainConfig.stages``)."""
    config: StageConfig
    """The whole stage config (trainable groups, learning rates, loss weights, settings ...)."""

    @property
    def active_losses(self) -> frozenset[str]:
        """Names of the losses with a positive weight: the only ones the engine adds to the total."""
        return frozenset(name for name, weight in self.config.loss_weights.items() if weight > 0)

    @property
    def settings(self) -> Mapping[str, Any]:
        """The method's settings that differ in this stage, by dotted name (``StageConfig.settings``)."""
        return self.config.settings


@runtime_checkable
class Task(Protocol):
    """A ``torch.nn.Module`` that maps a batch to a dict of UNWEIGHTED named losses.

    The engine calls :meth:`configure_stage` before each stage, on every worker, and once per stage in the driver
    before any worker starts (there an error in the stage's settings fails fast). Only the task is wrapped by
    DDP/DeepSpeed: frozen references (VGG for ground-truth maps, an original encoder) belong outside it, e.g. in the
    batch source's stages.
    """

    needs: frozenset[str]
    """Capabilities the task needs from the strategy in the stage it was last configured for, beyond one plain
    backward (names from :data:`robustfm.train.capabilities.CAPABILITIES`; a class attribute when fixed). The run's
    strategy must provide the union over its stages; a method's registry entry declares the same ``needs``."""

    def configure_stage(self, stage: StageSpec) -> None:
        """Prepare for ``stage``: note ``stage.active_losses`` (the task may skip computing the others) and apply
        ``stage.settings``; raise :class:`~robustfm.config.ConfigError` naming ``stages.<name>.settings.<key>`` for a
        setting the task does not have (see :func:`stage_settings_applied`)."""
        ...

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Scalar losses by name for one batch (tensors already on the worker's device)."""
        ...

    def after_optimizer_step(self) -> None:
        """Called by the engine right after every optimizer step, on every rank (e.g. CLIP clamps its learned
        temperature here, as open_clip does, so that the forward pass never clamps away its gradient)."""
        ...

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Disjoint named groups of the task's parameters; stages train some groups and freeze the rest."""
        ...


def stage_settings_applied(config: ConfigT, stage: StageSpec) -> ConfigT:
    """``config`` (a method's config dataclass) with the stage's settings applied as dotted overrides and checked
    like any override; an error names ``stages.<stage>.settings.<key>``."""
    for key, value in stage.settings.items():
        try:
            config = replace_path(config, key, value)
        except ConfigError as err:
            raise ConfigError(f"stages.{stage.name}.settings.{key}", err.message) from None
    return config


def refuse_stage_settings(stage: StageSpec, method: str) -> None:
    """For a task without per-stage settings: raise ConfigError naming the stage's first setting."""
    if stage.settings:
        key = next(iter(stage.settings))
        raise ConfigError(
            f"stages.{stage.name}.settings.{key}", f"{method} has no per-stage settings; leave settings empty"
        )


@runtime_checkable
class BatchSource(Protocol):
    """Batches for one rank. Must be picklable (it travels to Ray workers) and deterministic given its arguments,
    so that a resumed run sees exactly the batches an uninterrupted one would.

    Every rank must get the same number of batches per epoch (collectives would otherwise hang).
    """

    def batches(self, epoch: int, rank: int, world_size: int, skip_batches: int) -> Iterable[dict[str, Any]]:
        """This rank's batches of ``epoch`` (counted over the whole run), after skipping the first ``skip_batches``."""
        ...

    def num_batches(self, epoch: int, rank: int, world_size: int) -> int | None:
        """How many batches :meth:`batches` yields without skipping (None: unknown; then the stage's
        ``max_batches_per_epoch`` must bound the epoch)."""
        ...


RunBatches = BatchSource | Mapping[str, BatchSource]
"""What a run trains on: one :class:`BatchSource` for every stage, or one per stage name (stages of one run that read
different data, e.g. CG-CLIP's Adapt without ground-truth maps and Isolate with them)."""


def stage_batches(batches: RunBatches, stage: str) -> BatchSource:
    """The batch source of ``stage``."""
    return batches[stage] if isinstance(batches, Mapping) else batches


def check_run_batches(batches: RunBatches, stages: Iterable[str]) -> None:
    """Raise ValueError unless per-stage batches name every stage of the run."""
    if isinstance(batches, Mapping):
        missing = [stage for stage in stages if stage not in batches]
        if missing:
            raise ValueError(f"no batch source for stage(s) {missing}; the per-stage batches name {sorted(batches)}")


def check_param_groups(groups: Mapping[str, list[nn.Parameter]], module: nn.Module) -> None:
    """Raise ValueError unless the groups are disjoint and hold only parameters of ``module``."""
    owned = {id(p) for p in module.parameters()}
    seen: dict[int, str] = {}
    for name, params in groups.items():
        for param in params:
            if id(param) not in owned:
                raise ValueError(f"parameter group {name!r} holds a tensor that is not a parameter of the task")
            if id(param) in seen:
                raise ValueError(
                    f"a parameter is in both groups {seen[id(param)]!r} and {name!r}; groups must be disjoint"
                )
            seen[id(param)] = name


def batch_size_of(batch: Mapping[str, Any]) -> int:
    """Samples in a batch: the leading size of its first tensor (0 when it has none)."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 0


def move_batch(batch: Mapping[str, Any], device: torch.device, float_dtype: torch.dtype | None = None) -> dict:
    """Tensors to ``device`` (floating ones cast to ``float_dtype`` when given); other values unchanged."""
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if float_dtype is not None and value.is_floating_point():
                value = value.to(float_dtype)
        moved[key] = value
    return moved
