"""Blur corruptions: defocus, glass, motion, zoom and gaussian blur.

Parameters are ``imagecorruptions`` 1.1.2's, and the filters reproduce its libraries' kernels and borders
(skimage/scipy Gaussian with ``nearest`` border and truncate 4; OpenCV ``filter2D`` with ``BORDER_REFLECT_101``;
scipy's order-1 zoom), so these match the reference pixel for pixel (see tests/unit/test_corruptions_parity.py).

glass_blur reproduces the reference's pixel shuffle exactly (including what its numpy "swap" really does, see
:func:`local_shuffle`) with batched gathers instead of a Python loop over every pixel (> 1 s per 224 px image).
The one known source of difference is the uint8 truncation after the first blur: a value within float rounding of
an integer grey level can truncate to the level below in one implementation and not in the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from robustfm.corruptions.base import register_corruption, uniform
from robustfm.corruptions.ops import (
    clipped_zoom,
    correlate2d,
    correlate_separable,
    gaussian_filter,
    motion_blur_batch,
)

GAUSSIAN_BLUR_SIGMA = (1, 2, 3, 4, 6)
# (sigma, max_delta, iterations)
GLASS_BLUR_PARAMS = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))
# (disk radius, anti-alias sigma)
DEFOCUS_BLUR_PARAMS = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))
# (radius, sigma) of the one-sided motion kernel; the angle is uniform in [-45, 45) degrees
MOTION_BLUR_PARAMS = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))
MOTION_BLUR_ANGLE = (-45.0, 45.0)
# np.arange(start, stop, step) of zoom factors, kept as the reference writes them so the float ends agree
ZOOM_BLUR_RANGES = ((1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03))


@register_corruption("gaussian_blur", GAUSSIAN_BLUR_SIGMA, kind="blur")
def gaussian_blur(images: Tensor, severity: int, draws: Mapping[str, Tensor]) -> Tensor:
    """Gaussian blur with sigma 1..6 px (independent of image size, as in the reference)."""
    return gaussian_filter(images, GAUSSIAN_BLUR_SIGMA[severity - 1]).clamp(0, 1)


@lru_cache(maxsize=8)
def defocus_kernel(radius: int, alias_blur: float) -> np.ndarray:
    """The reference's anti-aliased disk: a normalised binary disk smoothed by a 3x3 (5x5 above radius 8) Gaussian."""
    half = 8 if radius <= 8 else radius
    ksize = 3 if radius <= 8 else 5
    grid = np.arange(-half, half + 1)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float64)
    disk /= disk.sum()
    # OpenCV's getGaussianKernel for sigma > 0: exp(-x^2 / (2 sigma^2)) on centred taps, normalised.
    x = np.arange(ksize) - (ksize - 1) / 2
    g = np.exp(-(x**2) / (2 * alias_blur**2))
    g /= g.sum()
    smoothed = correlate_separable(torch.from_numpy(disk)[None, None], g, g, mode="mirror")
    return smoothed[0, 0].numpy()


@register_corruption("defocus_blur", DEFOCUS_BLUR_PARAMS, kind="blur")
def defocus_blur(images: Tensor, severity: int, draws: Mapping[str, Tensor]) -> Tensor:
    """Convolution with an anti-aliased disk of radius 3..10 px."""
    kernel = torch.from_numpy(defocus_kernel(*DEFOCUS_BLUR_PARAMS[severity - 1]))
    return correlate2d(images, kernel, mode="mirror").clamp(0, 1)


def _draw_angle(image: Tensor, severity: int, generator: torch.Generator) -> dict[str, Tensor]:
    return {"angle": uniform(generator, *MOTION_BLUR_ANGLE)}


@register_corruption("motion_blur", MOTION_BLUR_PARAMS, draw=_draw_angle, kind="blur")
def motion_blur(images: Tensor, severity: int, draws: Mapping[str, Tensor]) -> Tensor:
    """ImageMagick-style one-sided motion blur along ``draws["angle"]`` (degrees, one per sample)."""
    radius, sigma = MOTION_BLUR_PARAMS[severity - 1]
    return motion_blur_batch(images, radius, sigma, draws["angle"]).clamp(0, 1)


def zoom_factors(severity: int) -> np.ndarray:
    """The zoom factors averaged by zoom_blur at ``severity``."""
    return np.arange(*ZOOM_BLUR_RANGES[severity - 1])


@register_corruption("zoom_blur", ZOOM_BLUR_RANGES, kind="blur")
def zoom_blur(images: Tensor, severity: int, draws: Mapping[str, Tensor]) -> Tensor:
    """Mean of the image and its centre zooms by each factor of :func:`zoom_factors` (bilinear)."""
    h, w = images.shape[-2:]
    factors = zoom_factors(severity)
    total = images.clone()
    for factor in factors:
        total += clipped_zoom(images, float(factor))[..., :h, :w]
    return (total / (len(factors) + 1)).clamp(0, 1)


def _draw_swaps(image: Tensor, severity: int, generator: torch.Generator) -> dict[str, Tensor]:
    _, max_delta, iterations = GLASS_BLUR_PARAMS[severity - 1]
    h, w = image.shape[-2:]
    # (dx, dy) per iteration and pixel, in [-max_delta, max_delta) like np.random.randint(-d, d); only the interior
    # pixels (rows and columns max_delta+1 .. size-max_delta) use theirs.
    offsets = torch.randint(
        -max_delta, max_delta, (iterations, h, w, 2), generator=generator, dtype=torch.int8, device=generator.device
    )
    return {"offsets": offsets}


def _quantize_floor(images: Tensor) -> Tensor:
    # The reference stores the first blur as uint8, truncating: np.uint8(x * 255). The 1e-4 keeps a grey level that
    # float32 rounding put a hair below an integer on that integer (float64 in the reference rarely lands there).
    return images.mul(255).add_(1e-4).floor_().div_(255)


def local_shuffle(images: Tensor, offsets: Tensor, max_delta: int) -> Tensor:
    """The reference's pixel "swaps", exactly, without its per-pixel Python loop.

    The reference visits interior pixels in descending raster order and writes ``x[p], x[q] = x[q], x[p]`` with
    ``q = p + offset[p]``. On numpy rows this is not a swap: ``x[p]`` is a view, so after the first assignment both
    pixels hold ``x[q]`` and the second assignment changes nothing. Each visit therefore copies ``x[q]`` into ``p``.
    If ``q`` comes later in the raster order than ``p``, it was already visited and holds its own new value, so the
    value at ``p`` is found by following ``p -> q -> ...`` until a step goes back in raster order (or stays, or
    leaves the interior): that pixel's original value. The chains strictly increase, so pointer doubling resolves
    them all in a few batched gathers.

    Args:
        images: (N, C, H, W).
        offsets: (N, iterations, H, W, 2) integer (dx, dy) in [-max_delta, max_delta).
        max_delta: the severity's maximum offset; rows and columns ``max_delta + 1 .. size - max_delta`` are visited.
    """
    n, c, h, w = images.shape
    device = images.device
    size = h * w
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    visited = (rows > max_delta) & (rows <= h - max_delta) & (cols > max_delta) & (cols <= w - max_delta)
    # int32 flat indices and index_select: several times faster than int64 advanced indexing on CPU.
    own = (torch.arange(n, device=device, dtype=torch.int32).view(n, 1, 1) * size + rows * w + cols).reshape(-1)
    own = own.to(torch.int32)
    pointer = own  # value at p (flat over the batch) = original[pointer[p]]
    for it in range(offsets.shape[1]):
        off = offsets[:, it].to(device)
        dx = torch.where(visited, off[..., 0], 0).to(torch.int32)
        dy = torch.where(visited, off[..., 1], 0).to(torch.int32)
        ty, tx = rows + dy, cols + dx
        target_visited = (ty > max_delta) & (ty <= h - max_delta) & (tx > max_delta) & (tx <= w - max_delta)
        # (step, final): the value at p is orig[step] when final, else the value at step. A step is final when it
        # goes back (or stays) in raster order or lands on a pixel that is never visited; doubling follows chains.
        forward = (dy > 0) | ((dy == 0) & (dx > 0))
        final = (~(forward & target_visited)).reshape(-1)
        step = own + (dy * w + dx).reshape(-1)
        active = torch.nonzero(~final).squeeze(1)
        while active.numel():
            hop = step.index_select(0, active)
            step.index_copy_(0, active, step.index_select(0, hop))
            done = final.index_select(0, hop)
            final.index_copy_(0, active, done)
            active = active[~done]
        pointer = pointer.index_select(0, step)
    pixels = images.permute(0, 2, 3, 1).reshape(n * size, c)
    return pixels.index_select(0, pointer).reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous()


@register_corruption("glass_blur", GLASS_BLUR_PARAMS, draw=_draw_swaps, kind="blur")
def glass_blur(images: Tensor, severity: int, draws: Mapping[str, Tensor]) -> Tensor:
    """Gaussian blur, uint8 storage, local pixel shuffle (:func:`local_shuffle`), Gaussian blur again."""
    sigma, max_delta, _ = GLASS_BLUR_PARAMS[severity - 1]
    blurred = _quantize_floor(gaussian_filter(images, sigma))
    shuffled = local_shuffle(blurred, draws["offsets"], max_delta)
    return gaussian_filter(shuffled, sigma).clamp(0, 1)
