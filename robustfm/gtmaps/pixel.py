"""Pixel-L1 ground-truth map: the cheap, model-free alternative to the VGG feature map."""

from __future__ import annotations

import torch

from robustfm.gtmaps.base import GTMapper
from robustfm.gtmaps.registry import PIXEL_L1_DEFAULT_SCALE


class PixelL1Mapper(GTMapper):
    """``clip(mean_c |clean - corrupted| / scale, 0, 1)`` per pixel.

    Args:
        scale: raw value (a mean absolute difference of [0,1] pixels) that maps to 1.
    """

    def __init__(self, scale: float = PIXEL_L1_DEFAULT_SCALE) -> None:
        super().__init__(scale)

    @classmethod
    def build(
        cls, weights: str | None = None, layers: tuple[int, ...] | None = None, scale: float | None = None
    ) -> PixelL1Mapper:
        """Factory used by :func:`robustfm.gtmaps.build_gt_mapper`; the pixel map has no weights and no layers."""
        if weights is not None or layers is not None:
            raise ValueError(f"pixel_l1 takes no weights or layers, got weights={weights!r}, layers={layers!r}")
        return cls(PIXEL_L1_DEFAULT_SCALE if scale is None else scale)

    def raw_map(self, clean: torch.Tensor, corrupted: torch.Tensor) -> torch.Tensor:
        return (clean - corrupted).abs().mean(dim=1, keepdim=True)
