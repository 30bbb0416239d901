"""Config section of the ground-truth maps. Importing this imports no torch.

(The corruption stage's config is :class:`robustfm.data.stage_config.CorruptionStageConfig`.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from robustfm.config.core import check

VGG_BLOCKS = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class GTMapConfig:
    """How ground-truth corruption maps are computed (one rule for every CG-CLIP stage and for evaluation)."""

    name: str = "vgg16_l1"
    """A ``robustfm.gtmaps.GT_MAPS`` name: ``vgg16_l1`` (CG-CLIP eq. 1) or ``pixel_l1`` (cheap, model-free)."""
    weights: str | None = "IMAGENET1K_V1"
    """vgg16_l1: torchvision weights name (downloads once; needs internet), a local ``.pth`` state dict or
    ``.safetensors`` file, or null for a seeded random VGG (tests only: its maps mean nothing). pixel_l1: null."""
    layers: tuple[int, ...] | None = VGG_BLOCKS
    """vgg16_l1: conv blocks among 1..5 whose last ReLU is compared (relu1_2 .. relu5_3). pixel_l1: null."""
    scale: float | None = None
    """Raw map value mapped to 1 (``map = clip(raw / scale, 0, 1)``), the same for every stage and evaluation. null:
    fitted when a run starts, for the configured weights and layers, on its first ``fit_images`` training images
    (the ``fit_quantile`` of raw values of their corrupted copies, :mod:`robustfm.gtmaps.fit`), cached beside the
    shards, logged and written into the run's resolved config. A given scale is checked on the same images: maps
    that saturate or vanish are warned about with their numbers."""
    fit_quantile: float = 0.99
    """Quantile of raw corrupted-pixel values mapped to 1 when the scale is fitted (the strongest 1% saturate)."""
    fit_images: int = 64
    """Training images (each with one corrupted copy) the scale is fitted and checked on."""
    min_actors: int = 1
    """Fewest GT-map actors (each holds one VGG)."""
    max_actors: int = 1
    """Most GT-map actors; the pool grows up to this while the stage is the bottleneck."""
    num_gpus: float = 0.0
    """GPUs per actor (0: the VGG runs on CPU). Fractions share one GPU between actors."""
    num_cpus: float = 1.0
    """CPUs per actor."""
    batch_size: int = 32
    """Rows per actor call."""

    def __post_init__(self) -> None:
        from robustfm.gtmaps.registry import GT_MAPS  # lazy entries: imports no torch

        check(self.name in GT_MAPS, "name", self.name, f"must be one of {GT_MAPS.names()}")
        if self.name == "pixel_l1":
            check(self.weights is None, "weights", self.weights, "must be null for pixel_l1 (it has no network)")
            check(self.layers is None, "layers", self.layers, "must be null for pixel_l1 (it has no layers)")
        if self.layers is not None:
            check(
                len(self.layers) > 0
                and set(self.layers) <= set(VGG_BLOCKS)
                and len(set(self.layers)) == len(self.layers),
                "layers",
                self.layers,
                "must be distinct conv blocks among 1..5",
            )
        if self.scale is not None:
            check(math.isfinite(self.scale) and self.scale > 0, "scale", self.scale, "must be a positive number")
        check(0.5 < self.fit_quantile < 1, "fit_quantile", self.fit_quantile, "must be in (0.5, 1)")
        check(self.fit_images >= 4, "fit_images", self.fit_images, "must be >= 4")
        check(self.min_actors >= 1, "min_actors", self.min_actors, "must be at least 1")
        check(self.max_actors >= self.min_actors, "max_actors", self.max_actors, "must be >= min_actors")
        check(self.num_gpus >= 0, "num_gpus", self.num_gpus, "must be >= 0")
        check(self.num_cpus > 0, "num_cpus", self.num_cpus, "must be > 0")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be at least 1")
