"""Parametric image edits with documented ranges: everyday photometric perturbations and COVAR geometric variants.

Usage::

    from robustfm.perturbations import perturb, sweep
    for value in sweep("jpeg_quality", 10):          # 10, 20, ..., 100
        edited = perturb(images, "jpeg_quality", value)

``perturb`` accepts names from both registries, :data:`PERTURBATIONS` (jpeg_quality, brightness, contrast,
saturation, hue, sharpness, gaussian_noise, gaussian_blur, downscale) and :data:`GEOMETRIC_VARIANTS` (flip_h, flip_v,
translate, center_crop, rotate, scale). Each entry's meta holds ``low``, ``high``, ``identity`` and ``description``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from robustfm.perturbations import geometric, photometric  # noqa: F401  (registers the entries)
from robustfm.perturbations.registry import GEOMETRIC_VARIANTS, PERTURBATIONS, lookup

__all__ = ["GEOMETRIC_VARIANTS", "PERTURBATIONS", "perturb", "perturbation_meta", "sweep"]


def perturbation_meta(name: str) -> dict:
    """The meta of ``name`` (``low``, ``high``, ``identity``, ``description``, ...) from whichever registry has it."""
    registry, _ = lookup(name)
    return dict(registry.meta(name))


def perturb(
    images: torch.Tensor,
    name: str,
    value: float,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Apply perturbation or geometric variant ``name`` with parameter ``value`` to a batch.

    Args:
        images: float [0,1] images (N, 3, H, W), on any device.
        name: a name of :data:`PERTURBATIONS` or :data:`GEOMETRIC_VARIANTS`.
        value: the edit's parameter; values outside the documented range are allowed (they extrapolate) but
            must be finite.
        generator: random edits (``gaussian_noise``) draw from it: one generator for the whole batch, or one per
            image (the same image then gets the same noise in any batch). ``None`` uses torch's global generator.

    Returns:
        The edited batch: same shape, dtype and device, values in [0,1].
    """
    _, fn = lookup(name)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"perturb({name!r}): images must be (N, 3, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"perturb({name!r}): images must be float in [0,1], got dtype {images.dtype}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"perturb({name!r}): value must be finite, got {value}")
    if isinstance(generator, torch.Generator):
        generators = [generator] * images.shape[0]  # drawn one image after the other from the same stream
    elif generator is None:
        generators = None
    else:
        generators = list(generator)
        if len(generators) != images.shape[0]:
            raise ValueError(f"perturb({name!r}): got {len(generators)} generators for {images.shape[0]} images")
    return fn(images, value, generators)


def sweep(name: str, n: int) -> list[float]:
    """``n >= 2`` equally spaced parameter values from the entry's ``low`` to its ``high``, both included exactly."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"sweep({name!r}, n): n must be an integer >= 2 (the two ends of the range), got {n!r}")
    meta = perturbation_meta(name)
    low, high = meta["low"], meta["high"]
    inner = [low + (high - low) * i / (n - 1) for i in range(1, n - 1)]
    return [low, *inner, high]
