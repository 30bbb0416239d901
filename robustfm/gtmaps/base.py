"""What every ground-truth map shares: a frozen module, input checks, and the normalisation rule.

Normalisation (the same in every CG-CLIP stage and in evaluation, because it is part of the mapper and its config):

    map = clip(raw / scale, 0, 1)

with ``scale`` a fixed config value (``gt_map.scale``; default: the registry's ``default_scale``, fitted on data as
:mod:`robustfm.gtmaps.fit` documents). A fixed scale keeps map strength comparable across images: dividing by each
image's own maximum would blow a barely visible change up to a full-strength target and turn float noise into a
map. Pairs whose corrupted image equals the clean one get an exactly all-zero map, whatever the kernels do.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class GTMapper(nn.Module):
    """Base class: ``mapper(clean, corrupted) -> Tensor[N, 1, H, W]`` in [0,1]. Frozen: always eval, no gradients.

    Subclasses implement :meth:`raw_map`, the unnormalised per-pixel difference.

    Args:
        scale: the raw value mapped to 1 (larger raw values clip to 1). Must be positive and finite.
    """

    def __init__(self, scale: float) -> None:
        super().__init__()
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"{type(self).__name__}: scale must be a positive finite number, got {scale!r}")
        self.scale = float(scale)

    def raw_map(self, clean: torch.Tensor, corrupted: torch.Tensor) -> torch.Tensor:
        """The unnormalised map (N, 1, H, W) of two checked float32 batches on this module's device."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> GTMapper:
        # A ground-truth map must not change with the trainer's train()/eval() calls.
        return super().train(False)

    def _checked(self, clean: torch.Tensor, corrupted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        name = type(self).__name__
        if clean.shape != corrupted.shape:
            raise ValueError(
                f"{name}: clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} differ in shape"
            )
        if clean.ndim != 4 or clean.shape[1] != 3:
            raise ValueError(f"{name}: images must be (N, 3, H, W) in [0,1], got shape {tuple(clean.shape)}")
        if not (clean.is_floating_point() and corrupted.is_floating_point()):
            raise ValueError(f"{name}: images must be float in [0,1], got {clean.dtype} and {corrupted.dtype}")
        return clean.float(), corrupted.float()

    @torch.no_grad()
    def raw(self, clean: torch.Tensor, corrupted: torch.Tensor) -> torch.Tensor:
        """Checked :meth:`raw_map` without normalisation (for fitting ``scale``)."""
        clean, corrupted = self._checked(clean, corrupted)
        return self.raw_map(clean, corrupted)

    @torch.no_grad()
    def forward(self, clean: torch.Tensor, corrupted: torch.Tensor) -> torch.Tensor:
        """The normalised map, float32 (N, 1, H, W) in [0,1], on the inputs' device (move the mapper there first)."""
        clean, corrupted = self._checked(clean, corrupted)
        maps = (self.raw_map(clean, corrupted) / self.scale).clamp_(0.0, 1.0)
        # Exact zeros for clean pairs even if a kernel (e.g. cuDNN's) is not bitwise batch-invariant.
        unchanged = (clean == corrupted).flatten(1).all(dim=1)
        maps[unchanged] = 0.0
        return maps

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"
