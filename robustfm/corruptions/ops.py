"""Batched torch building blocks shared by the corruptions: filters, resampling, shifts, colour helpers.

Every function takes images as float tensors ``(N, C, H, W)`` on any device and keeps dtype and device. Boundary
modes follow the libraries the reference corruptions were written with, so that the corruptions built on them can
match ``imagecorruptions`` pixel for pixel:

- ``"nearest"``: the edge pixel repeats (scipy ``nearest``, OpenCV ``BORDER_REPLICATE``);
- ``"reflect"``: mirror including the edge pixel, ``d c b a | a b c d`` (scipy ``reflect``);
- ``"mirror"``: mirror without repeating the edge, ``d c b | a b c d`` (scipy ``mirror``, OpenCV
  ``BORDER_REFLECT_101``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

BOUNDARY_MODES = ("nearest", "reflect", "mirror")

# ITU-R BT.601 luma weights, as OpenCV's RGB2GRAY uses them.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def boundary_index(size: int, before: int, after: int, mode: str) -> np.ndarray:
    """Source indices for a 1-D axis of ``size`` padded by ``before``/``after`` samples under ``mode``."""
    if mode not in BOUNDARY_MODES:
        raise ValueError(f"boundary mode {mode!r} is not one of {BOUNDARY_MODES}")
    idx = np.arange(-before, size + after)
    if mode == "nearest":
        return np.clip(idx, 0, size - 1)
    if size == 1:
        return np.zeros_like(idx)
    if mode == "reflect":
        period = 2 * size
        idx = np.mod(idx, period)
        return np.where(idx >= size, period - 1 - idx, idx)
    period = 2 * size - 2
    idx = np.mod(idx, period)
    return np.where(idx >= size, period - idx, idx)


def pad2d(images: Tensor, pad_y: tuple[int, int], pad_x: tuple[int, int], mode: str) -> Tensor:
    """Pad the last two dims under ``mode``; unlike ``F.pad`` this allows mirror pads wider than the image.

    ``F.pad``'s own replicate/reflect kernels are used where they apply (several times faster than the two index
    gathers, which handle the rest: scipy's "reflect", over-wide mirrors, bool tensors).
    """
    h, w = images.shape[-2:]
    if images.dim() in (3, 4) and images.dtype != torch.bool:
        if mode == "nearest" or (mode == "mirror" and max(pad_y) < h and max(pad_x) < w):
            return F.pad(images, (*pad_x, *pad_y), mode="replicate" if mode == "nearest" else "reflect")
    iy = torch.from_numpy(boundary_index(h, *pad_y, mode)).to(images.device)
    ix = torch.from_numpy(boundary_index(w, *pad_x, mode)).to(images.device)
    return images.index_select(-2, iy).index_select(-1, ix)


@lru_cache(maxsize=64)
def gaussian_kernel1d(sigma: float, truncate: float) -> np.ndarray:
    """scipy.ndimage's sampled Gaussian: radius ``int(truncate * sigma + 0.5)``, normalised to sum 1."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


@lru_cache(maxsize=128)
def _band_matrix(size: int, kernel: tuple[float, ...], mode: str) -> Tensor:
    """(size, size) matrix applying a centred 1-D correlation along an axis, with the boundary folded in."""
    radius = len(kernel) // 2
    source = boundary_index(size, radius, radius, mode)
    matrix = np.zeros((size, size))
    rows = np.arange(size)
    for j, weight in enumerate(kernel):
        np.add.at(matrix, (rows, source[rows + j]), weight)
    return torch.from_numpy(matrix)


_BAND_BLOCK = 32  # output rows (columns) per product in correlate_separable: the band and a block fit in cache


@lru_cache(maxsize=64)
def _band_blocks(size: int, radius: int) -> tuple[tuple[int, int, int, int], ...]:
    """(first, last, lo, hi): outputs [first, last) of a band matrix of ``radius`` read inputs [lo, hi) only."""
    if 2 * radius + _BAND_BLOCK >= size // 2:  # the band is most of the matrix: one dense product
        return ((0, size, 0, size),)
    starts = range(0, size, _BAND_BLOCK)
    return tuple(
        (first, min(size, first + _BAND_BLOCK), max(0, first - radius), min(size, first + _BAND_BLOCK + radius))
        for first in starts
    )


def correlate_separable(images: Tensor, kernel_y: np.ndarray, kernel_x: np.ndarray, mode: str) -> Tensor:
    """Correlate every channel with ``kernel_y`` along H then ``kernel_x`` along W (odd lengths, centred).

    Each pass multiplies by a banded (H, H) or (W, W) matrix that also holds the boundary rule: on CPU a BLAS product
    beats a direct single-channel convolution with long 1-D kernels by far, and the boundary needs no padding copy.
    On CPU the product runs block by block over the band (32 outputs from 32 + 2 radius inputs), not over the zeros
    around it: 2-4 times less work for the usual sigmas, with the same sums (the skipped terms are exact zeros).
    """
    h, w = images.shape[-2:]
    my = _band_matrix(h, tuple(float(v) for v in kernel_y), mode).to(images.device, images.dtype)
    mx = _band_matrix(w, tuple(float(v) for v in kernel_x), mode).to(images.device, images.dtype)
    if images.device.type != "cpu":  # a GPU does the zeros for free; fewer launches matter more there
        return torch.matmul(torch.matmul(my, images), mx.T)
    blocks_y, blocks_x = _band_blocks(h, len(kernel_y) // 2), _band_blocks(w, len(kernel_x) // 2)
    if len(blocks_y) == 1:
        rows = torch.matmul(my, images)
    else:
        rows = torch.empty(images.shape, dtype=images.dtype)
        for first, last, lo, hi in blocks_y:
            torch.matmul(my[first:last, lo:hi], images[..., lo:hi, :], out=rows[..., first:last, :])
    if len(blocks_x) == 1:
        return torch.matmul(rows, mx.T)
    out = torch.empty_like(rows)
    for first, last, lo, hi in blocks_x:
        torch.matmul(rows[..., lo:hi], mx[first:last, lo:hi].T, out=out[..., first:last])
    return out


def gaussian_filter(
    images: Tensor, sigma: float | tuple[float, float], mode: str = "nearest", truncate: float = 4.0
) -> Tensor:
    """Per-channel Gaussian blur with scipy.ndimage.gaussian_filter's kernel and boundary (skimage's default)."""
    sy, sx = (sigma, sigma) if isinstance(sigma, int | float) else sigma
    return correlate_separable(
        images, gaussian_kernel1d(float(sy), truncate), gaussian_kernel1d(float(sx), truncate), mode
    )


def correlate2d(images: Tensor, kernel: Tensor, mode: str = "mirror") -> Tensor:
    """Correlate every channel with one odd-sized 2-D kernel (OpenCV ``filter2D`` with ``BORDER_REFLECT_101``).

    Kernels of 11 taps or more go through the FFT, as OpenCV does, which is far cheaper than a direct conv on CPU.
    """
    n, c, h, w = images.shape
    kh, kw = kernel.shape
    ry, rx = kh // 2, kw // 2
    padded = pad2d(images.reshape(n * c, 1, h, w), (ry, ry), (rx, rx), mode)
    if kh < 11:
        weight = kernel.to(device=images.device, dtype=images.dtype).view(1, 1, kh, kw)
        return F.conv2d(padded, weight).reshape(n, c, h, w)
    # Correlation = convolution with the flipped kernel. Any transform length from the padded size up leaves the
    # valid part of the circular result exact, so take a fast (5-smooth) one.
    size = (_fft_length(padded.shape[-2]), _fft_length(padded.shape[-1]))
    spectrum = torch.fft.rfft2(padded, s=size)
    key = kernel.detach().to("cpu", torch.float64).numpy().tobytes()
    spectrum *= _kernel_spectrum(key, kh, kw, size, images.dtype, images.device)
    full = torch.fft.irfft2(spectrum, s=size)
    return full[..., kh - 1 : kh - 1 + h, kw - 1 : kw - 1 + w].reshape(n, c, h, w)


@lru_cache(maxsize=64)
def _fft_length(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n: a transform length with a large prime factor costs several times more."""
    length = n
    while True:
        rest = length
        for prime in (2, 3, 5):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return length
        length += 1


@lru_cache(maxsize=16)
def _kernel_spectrum(
    kernel_bytes: bytes, kh: int, kw: int, size: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """rfft2 of the flipped float64 kernel (given as bytes, to key the cache) at transform ``size``."""
    kernel = torch.frombuffer(bytearray(kernel_bytes), dtype=torch.float64).view(kh, kw)
    return torch.fft.rfft2(kernel.flip(0, 1).to(device, dtype), s=size)


def clipped_zoom(images: Tensor, zoom: float) -> Tensor:
    """``imagecorruptions.clipped_zoom`` batched: centre crop enlarged by ``zoom`` (bilinear), NOT cropped back.

    scipy's order-1 zoom samples the crop at ``o * (crop - 1) / (out - 1)``: bilinear with aligned corners.
    """
    h, w = images.shape[-2:]
    crop_h, crop_w = int(math.ceil(h / float(zoom))), int(math.ceil(w / float(zoom)))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    size = (int(round(crop_h * zoom)), int(round(crop_w * zoom)))
    crop = images[..., top : top + crop_h, left : left + crop_w]
    return F.interpolate(crop, size=size, mode="bilinear", align_corners=True)


def motion_offsets(width: int, angles_deg: Tensor) -> tuple[Tensor, Tensor]:
    """Integer (dy, dx) of tap ``i`` of the reference's ImageMagick-style motion blur, for each angle: (N, width)."""
    rad = torch.deg2rad(angles_deg.double()).unsqueeze(1)
    i = torch.arange(width, dtype=torch.float64, device=angles_deg.device).unsqueeze(0)
    # The reference scales a point by `width` and divides by its norm again: only sin/cos survive.
    dy = -torch.ceil(i * torch.sin(rad) - 0.5)
    dx = -torch.ceil(i * torch.cos(rad) - 0.5)
    return dy.long(), dx.long()


def motion_kernel(radius: int, sigma: float) -> np.ndarray:
    """The one-sided Gaussian tap weights of the reference motion blur (``2 * radius + 1`` taps, sum 1)."""
    x = np.arange(2 * radius + 1, dtype=np.float64)
    k = np.exp(-(x**2) / (2 * sigma**2)) / (np.sqrt(2 * np.pi) * sigma)
    return k / k.sum()


def motion_blur_batch(images: Tensor, radius: int, sigma: float, angles_deg: Tensor) -> Tensor:
    """Sum of edge-clamped shifted copies along each sample's angle, weighted by :func:`motion_kernel`.

    Taps are dropped from the first one whose shift reaches the image size, as the reference stops there (without
    renormalising). On CPU the image is edge-padded once and each tap of each sample is a strided view of it; on
    other devices each tap is one gather over the whole batch (a few kernel launches instead of N per tap).
    """
    if images.device.type != "cpu":
        return _motion_blur_gather(images, radius, sigma, angles_deg)
    n, c, h, w = images.shape
    kernel = motion_kernel(radius, sigma)
    dy, dx = motion_offsets(len(kernel), angles_deg.detach().cpu())
    pad = len(kernel)
    padded = pad2d(images, (pad, pad), (pad, pad), "nearest")
    out = torch.zeros_like(images)
    for s in range(n):
        for i, weight in enumerate(kernel.tolist()):
            oy, ox = int(dy[s, i]), int(dx[s, i])
            if abs(oy) >= h or abs(ox) >= w:
                break  # the reference stops at the first tap beyond the image
            out[s].add_(padded[s, :, pad - oy : pad - oy + h, pad - ox : pad - ox + w], alpha=weight)
    return out


def _motion_blur_gather(images: Tensor, radius: int, sigma: float, angles_deg: Tensor) -> Tensor:
    """:func:`motion_blur_batch` as one batched gather per tap (the GPU path; same result)."""
    n, c, h, w = images.shape
    kernel = motion_kernel(radius, sigma)
    dy, dx = motion_offsets(len(kernel), angles_deg.to(images.device))
    inside = (dy.abs() < h) & (dx.abs() < w)
    inside = torch.cumprod(inside.long(), dim=1).bool()  # stop at the first tap outside, like the reference
    rows = torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device)
    flat = images.reshape(n, c, h * w)
    out = torch.zeros_like(flat)
    for i, weight in enumerate(kernel.tolist()):
        src_y = (rows.unsqueeze(0) - dy[:, i : i + 1]).clamp(0, h - 1)  # (N, H)
        src_x = (cols.unsqueeze(0) - dx[:, i : i + 1]).clamp(0, w - 1)  # (N, W)
        index = (src_y.unsqueeze(2) * w + src_x.unsqueeze(1)).reshape(n, 1, h * w).expand(n, c, h * w)
        tap = weight * inside[:, i].to(images.dtype).view(n, 1, 1)
        out.add_(flat.gather(2, index) * tap)
    return out.reshape(n, c, h, w)


def rgb_to_gray(images: Tensor) -> Tensor:
    """Luma ``(N, 1, H, W)`` with OpenCV's RGB2GRAY weights."""
    r, g, b = LUMA_WEIGHTS
    return r * images[:, 0:1] + g * images[:, 1:2] + b * images[:, 2:3]


def stack_draws(draws: Sequence[dict[str, Tensor]], device: torch.device) -> dict[str, Tensor]:
    """Stack per-sample draw dicts into one dict of batched tensors on ``device``."""
    if not draws:
        return {}
    keys = draws[0].keys()
    return {key: torch.stack([d[key] for d in draws]).to(device) for key in keys}
