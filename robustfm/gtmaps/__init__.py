"""Ground-truth corruption maps for CG-CLIP's corruption decoder.

``build_gt_mapper("vgg16_l1", weights="IMAGENET1K_V1")(clean, corrupted)`` returns float32 (N, 1, H, W) maps in
[0,1]; equal clean and corrupted images give all-zero maps. See :mod:`robustfm.gtmaps.base` for the normalisation
rule and :mod:`robustfm.gtmaps.fit` for how the default scales were fitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from robustfm.gtmaps.registry import GT_MAPS

if TYPE_CHECKING:
    from robustfm.gtmaps.base import GTMapper

__all__ = ["GT_MAPS", "GTMapper", "build_gt_mapper"]


def __getattr__(name: str):
    # GTMapper lives beside torch; importing the package (e.g. for the registry or config) must stay light.
    if name == "GTMapper":
        from robustfm.gtmaps.base import GTMapper

        return GTMapper
    raise AttributeError(f"module 'robustfm.gtmaps' has no attribute {name!r}")


def build_gt_mapper(
    name: str,
    weights: str | None = None,
    layers: Sequence[int] | None = None,
    scale: float | None = None,
) -> GTMapper:
    """Build the registered ground-truth mapper ``name`` ("vgg16_l1" or "pixel_l1"), frozen, on the CPU.

    Args:
        name: a :data:`GT_MAPS` name.
        weights: vgg16_l1 only: a torchvision weights name ("IMAGENET1K_V1"), a local .pth/.safetensors path, or
            None for a seeded random init (tests). pixel_l1 takes none.
        layers: vgg16_l1 only: conv blocks among 1..5 (None: all five).
        scale: raw value mapped to 1 (None: the registry's fitted ``default_scale``).
    """
    mapper_class = GT_MAPS.get(name)
    return mapper_class.build(weights=weights, layers=None if layers is None else tuple(layers), scale=scale)
