"""The corruption registry and the split of every corruption into random draws and a deterministic batched apply.

A corruption is two functions:

- ``draw(image, severity, generator) -> dict[str, Tensor]`` makes one sample's random draws (noise fields, angles,
  offsets, crop positions) from that sample's own ``torch.Generator``. It sees the sample's image (some draws, like
  shot noise counts, depend on it) and nothing else of the batch, so a sample gets the same draws in any batch.
- ``apply(images, severity, draws) -> Tensor`` is deterministic and batched: ``images`` is ``(N, 3, H, W)`` in
  [0, 1] and ``draws`` holds the per-sample draws stacked along a leading N axis.

Tests inject the reference implementation's own draws into ``apply`` to compare pixel against pixel. Deterministic
corruptions have ``draw=None`` and receive an empty dict.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from robustfm.registry import Registry

SEVERITIES = (1, 2, 3, 4, 5)

DrawFn = Callable[[Tensor, int, torch.Generator], dict[str, Tensor]]
ApplyFn = Callable[[Tensor, int, Mapping[str, Tensor]], Tensor]


@dataclass(frozen=True)
class Corruption:
    """One registered corruption.

    Attributes:
        name: registry name, as in ImageNet-C.
        apply: the deterministic batched function ``(images, severity, draws) -> corrupted``.
        draw: per-sample random draws, or None for corruptions without randomness.
        severities: the five parameter tuples of the reference, index ``severity - 1``.
    """

    name: str
    apply: ApplyFn
    draw: DrawFn | None
    severities: tuple[Any, ...]

    @property
    def is_random(self) -> bool:
        return self.draw is not None

    def params(self, severity: int) -> Any:
        """The reference's parameters at ``severity`` (1..5)."""
        return self.severities[check_severity(severity) - 1]


CORRUPTIONS: Registry[Corruption] = Registry("corruption")


def check_severity(severity: int) -> int:
    """Return ``severity`` if it is an int in 1..5, else raise ValueError naming it."""
    if isinstance(severity, bool) or int(severity) != severity or severity not in SEVERITIES:
        raise ValueError(f"corruption severity must be an integer in 1..5, got {severity!r}")
    return int(severity)


def check_images(images: Tensor) -> None:
    """Raise ValueError unless ``images`` is a floating (N, 3, H, W) tensor."""
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor of shape (N, 3, H, W) in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype}")


def register_corruption(name: str, severities: tuple[Any, ...], draw: DrawFn | None = None, **meta: Any):
    """Decorator registering ``apply`` as corruption ``name`` with its severity table (kept in the registry meta)."""
    if len(severities) != len(SEVERITIES):
        raise ValueError(f"corruption {name!r} needs {len(SEVERITIES)} severities, got {len(severities)}")

    def decorator(apply: ApplyFn) -> ApplyFn:
        corruption = Corruption(name=name, apply=apply, draw=draw, severities=tuple(severities))
        CORRUPTIONS.register(name, corruption, severities=tuple(severities), random=draw is not None, **meta)
        return apply

    return decorator


def uniform(generator: torch.Generator, low: float, high: float, size: tuple[int, ...] = ()) -> Tensor:
    """Uniform floats in [low, high) from ``generator`` (float64, on the generator's device)."""
    u = torch.rand(size, generator=generator, dtype=torch.float64, device=generator.device)
    return low + (high - low) * u


def randint(generator: torch.Generator, low: int, high: int, size: tuple[int, ...] = ()) -> Tensor:
    """Integers in [low, high) from ``generator`` (int64, on the generator's device)."""
    return torch.randint(low, high, size, generator=generator, device=generator.device)
