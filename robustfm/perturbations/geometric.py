"""COVAR-style geometric variants (paper 002): flips, translation, centre crop, rotation and scale.

The paper builds its scale and viewpoint subsets with generative models (outpainting, novel views); offline we use
their classic equivalents: scale shrinks the image onto a larger canvas, and there is no viewpoint variant. Areas
that the moved image no longer covers are filled with black (0), as torchvision's affine transforms do; a constant
fill keeps the variant free of invented content.

Ranges follow the paper: translation up to 20% of the side, centre crops of 60-90% of the area, rotation up to
45 degrees. Flips take a 0/1 switch so that they sweep like the others (``sweep("flip_h", 2) == [0.0, 1.0]``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torchvision.transforms.v2.functional as TF

from robustfm.perturbations.registry import GEOMETRIC_VARIANTS, register_edit

Generators = Sequence[torch.Generator] | None
_BILINEAR = TF.InterpolationMode.BILINEAR


@register_edit(
    GEOMETRIC_VARIANTS,
    "flip_h",
    low=0,
    high=1,
    identity=0,
    description="horizontal (left-right) flip when the value is >= 0.5, else the image unchanged",
)
def flip_h(images: torch.Tensor, value: float, generators: Generators = None) -> torch.Tensor:
    return images.flip(-1) if value >= 0.5 else images.clone()


@register_edit(
    GEOMETRIC_VARIANTS,
    "flip_v",
    low=0,
    high=1,
    identity=0,
    description="vertical (upside-down) flip when the value is >= 0.5, else the image unchanged",
)
def flip_v(images: torch.Tensor, value: float, generators: Generators = None) -> torch.Tensor:
    return images.flip(-2) if value >= 0.5 else images.clone()


@register_edit(
    GEOMETRIC_VARIANTS,
    "translate",
    low=-0.2,
    high=0.2,
    identity=0.0,
    description="diagonal shift as a fraction of the side (-0.2 .. 0.2; positive moves right and down), "
    "whole pixels, black fill",
)
def translate(images: torch.Tensor, value: float, generators: Generators = None) -> torch.Tensor:
    """Shift by ``round(value * W)`` columns and ``round(value * H)`` rows; whole pixels, so nothing is resampled."""
    height, width = images.shape[-2:]
    dy, dx = round(value * height), round(value * width)
    out = torch.zeros_like(images)
    src_rows, dst_rows = _shifted_span(height, dy)
    src_cols, dst_cols = _shifted_span(width, dx)
    out[..., dst_rows, dst_cols] = images[..., src_rows, src_cols]
    return out


def _shifted_span(length: int, shift: int) -> tuple[slice, slice]:
    shift = max(-length, min(length, shift))
    if shift >= 0:
        return slice(0, length - shift), slice(shift, length)
    return slice(-shift, length), slice(0, length + shift)


@register_edit(
    GEOMETRIC_VARIANTS,
    "center_crop",
    low=0.6,
    high=0.9,
    identity=1.0,
    description="centre crop keeping this fraction of the area (0.6 .. 0.9; 1 = no crop), "
    "resized back to the input size (antialiased bilinear)",
)
def center_crop(images: torch.Tensor, value: float, generators: Generators = None) -> torch.Tensor:
    height, width = images.shape[-2:]
    side = math.sqrt(value)  # the same aspect ratio, so each side keeps sqrt(area)
    crop = (max(1, round(height * side)), max(1, round(width * side)))
    if crop == (height, width):
        return images.clone()
    cropped = TF.center_crop(images, list(crop))
    return TF.resize(cropped, [height, width], interpolation=_BILINEAR, antialias=True).clamp(0.0, 1.0)


@register_edit(
    GEOMETRIC_VARIANTS,
    "rotate",
    low=-45.0,
    high=45.0,
    identity=0.0,
    description="rotation in degrees about the centre (-45 .. 45; positive is counter-clockwise), "
    "bilinear, black corners, same size",
)
def rotate(images: torch.Tensor, value: float, generators: Generators = None) -> torch.Tensor:
    if value == 0.0:  # grid sampling at angle 0 still blurs by float error; the identity should be exact
        return images.clone()
    return TF.rotate(images, float(value), interpolation=_BILINEAR, fill=[0.0]).clamp(0.0, 1.0)


@register_edit(
    GEOMETRIC_VARIANTS,
    "scale",
    low=0.5,
    high=1.0,
    identity=1.0,
    description="image shrunk to this fraction of its side (0.5 .. 1) and centred on a black canvas "
    "of the original size (offline stand-in for COVAR's outpainting)",
)
def scale(images: torch.Tensor, value: float, generators: Generators = None) -> torch.Tensor:
    height, width = images.shape[-2:]
    small = (max(1, round(height * value)), max(1, round(width * value)))
    if small == (height, width):
        return images.clone()
    shrunk = TF.resize(images, list(small), interpolation=_BILINEAR, antialias=True).clamp(0.0, 1.0)
    top, left = (height - small[0]) // 2, (width - small[1]) // 2
    canvas = torch.zeros_like(images)
    canvas[..., top : top + small[0], left : left + small[1]] = shrunk
    return canvas
