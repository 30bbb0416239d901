"""What a method gives the engine: a task (model + losses) and a source of batches.

The engine owns everything else: workers, strategy, stages, optimizer, schedule, checkpoints and metrics. Model code
never mentions rank or world size; the batch source is the only part that knows which rank reads what.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Task(Protocol):
    """A ``torch.nn.Module`` that maps a batch to a dict of UNWEIGHTED named losses.

    The engine sets ``active_losses`` (the names with a positive weight in the current stage) before each stage; a
    task may skip computing the other losses. Only the task is wrapped by DDP/DeepSpeed: frozen references (VGG for
    ground-truth maps, an original encoder) belong outside it, e.g. in the batch source's stages.
    """

    active_losses: frozenset[str]

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Scalar losses by name for one batch (tensors already on the worker's device)."""
        ...

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Disjoint named groups of the task's parameters; stages train some groups and freeze the rest."""
        ...


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
