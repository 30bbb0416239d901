"""Digital corruptions: brightness, contrast, saturate, elastic_transform, pixelate, jpeg_compression.

Parameters are ``imagecorruptions`` 1.1.2's. The reference goes through HSV (scikit-image) for brightness and
saturate; here the same results come straight from RGB: with hue and saturation fixed every channel is ``V`` times a
function of them, so changing V scales all channels by ``V'/V`` and changing S moves every channel towards V by
``S'/S``. Grey pixels (S = 0) have hue 0 in scikit-image, so raising their saturation tints them red, as there.

pixelate resizes with Pillow's BOX and NEAREST filters written as row boxes, a banded column matrix and a row index
map; the reference rounds the BOX result to uint8, here it stays float (at most half a grey level apart).
jpeg_compression runs the reference's own codec, Pillow (encode/decode on CPU per image; uint8 in, uint8 out).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, JpegImagePlugin  # noqa: F401  (registers JPEG without Pillow scanning all its plugins)
from torch import Tensor

from robustfm.corruptions.base import register_corruption, uniform
from robustfm.corruptions.ops import gaussian_filter

BRIGHTNESS_SHIFT = (0.1, 0.2, 0.3, 0.4, 0.5)
CONTRAST_FACTOR = (0.4, 0.3, 0.2, 0.1, 0.05)
# (saturation factor, saturation offset)
SATURATE_PARAMS = ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2))
JPEG_QUALITY = (25, 18, 15, 10, 7)
PIXELATE_FACTOR = (0.6, 0.5, 0.4, 0.3, 0.25)
ELASTIC_ALPHA = (250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1, 250 * 0.12)
ELASTIC_SIGMA_FRACTION = 0.01  # Gaussian sigma of the displacement field, per axis, as a fraction of the side
ELASTIC_MAX_FRACTION = 0.005  # raw displacement bound as a fraction of the height (both axes, like the reference)


@register_corruption("brightness", BRIGHTNESS_SHIFT, kind="digital")
def brightness(images: Tensor, severity: int, draws: Mapping[str, Tensor]) -> Tensor:
    """Add a constant to the HSV value channel (clipped at 1)."""
    shift = BRIGHTNESS_SHIFT[severity - 1]
    value = images.amax(dim=1, keepdim=True)
    new_value = (value + shift).clamp_(max=1)
    black = value <= 0
    ratio = torch.where(black, 0.0, new_value / value)
    # Black pixels have no hue or saturation: they become grey at the new value.
    base = torch.where(black, new_value, 0.0)
    return torch.addcmul(base, images, ratio).clamp_(0, 1)


@register_corruption("contrast", CONTRAST_FACTOR, kind="digital")
def contrast(images: Tensor, severity: int, draws: Mapping[str, Tensor]) -> Tensor:
    """Shrink every channel towards its own mean over the image."""
    factor = CONTRAST_FACTOR[severity - 1]
    means = images.mean(dim=(2, 3), keepdim=True)
    return torch.addcmul(means * (1 - factor), images, torch.tensor(factor, dtype=images.dtype)).clamp_(0, 1)


@register_corruption("saturate", SATURATE_PARAMS, kind="digital")
def saturate(images: Tensor, severity: int, draws: Mapping[str, Tensor]) -> Tensor:
    """Scale and offset the HSV saturation channel (clipped to [0, 1])."""
    factor, offset = SATURATE_PARAMS[severity - 1]
    value = images.amax(dim=1, keepdim=True)
    delta = value - images.amin(dim=1, keepdim=True)
    grey = delta <= 0
    sat = torch.where(grey, 0.0, delta / value.clamp(min=1e-30))
    new_sat = (sat * factor + offset).clamp_(0, 1)
    # Every channel moves towards V by S'/S: x' = V (1 - k) + x k.
    k = torch.where(grey, 0.0, new_sat / sat.clamp(min=1e-30))
    out = torch.addcmul(value * (1 - k), images, k)
    if bool(grey.any()):
        # Grey pixels have hue 0 (red) in scikit-image: (V, V(1 - S'), V(1 - S')).
        faded = value * (1 - new_sat)
        out[:, 1:] = torch.where(grey, faded, out[:, 1:])
    return out.clamp_(0, 1)


@lru_cache(maxsize=64)
def box_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's BOX resampling weights (out_size, in_size): input pixels whose centre falls in the output's box."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 0.5 * filter_scale
    weights = np.zeros((out_size, in_size))
    for o in range(out_size):
        centre = (o + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), in_size)
        x = (np.arange(lo, hi) - centre + 0.5) / filter_scale
        w = ((x > -0.5) & (x <= 0.5)).astype(np.float64)
        weights[o, lo:hi] = w / w.sum()
    return weights


@lru_cache(maxsize=64)
def nearest_resize_index(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's NEAREST source index per output pixel: ``int(x)`` of ``x = scale / 2 + o * scale``.

    Pillow accumulates ``x += scale`` pixel after pixel; the float sum sometimes lands just below an integer where
    ``(o + 0.5) * scale`` would not, so the same running sum is replayed here.
    """
    scale = in_size / out_size
    position, index = scale * 0.5, []
    for _ in range(out_size):
        index.append(min(int(position), in_size - 1))
        position += scale
    return np.array(index, dtype=np.int64)


@dataclass(frozen=True)
class _PixelatePlan:
    """Precomputed index maps and matrices of one (size, factor, dtype, device) for :func:`pixelate`."""

    small_h: int
    boxes: int  # small_h, plus one when some input row is in no box
    row_box: Tensor | None  # (H,) the BOX (downsampled row) of each input row; small_h for a row in none
    rows: Tensor  # (small_h, H) BOX weights along H, used when some input row is in two boxes (row_box None)
    row_scale: Tensor  # (small_h, 1): 1 / rows in each box
    columns_t: Tensor  # (W, W): BOX down then NEAREST up along W, transposed for ``rows @ columns_t``
    column_blocks: tuple[tuple[int, int, int, int], ...]  # (first, last, lo, hi): outputs [first, last) read [lo, hi)
    row_index: Tensor  # (H,) NEAREST source row of each output row


_PIXELATE_BLOCK = 32  # output columns per product: each depends on a few input columns only
_PIXELATE_CHUNK = 4  # images per pass: the intermediate rows of a chunk stay in cache between the steps


@lru_cache(maxsize=32)
def _pixelate_plan(h: int, w: int, factor: float, dtype: torch.dtype, device: torch.device) -> _PixelatePlan:
    small_h, small_w = max(int(h * factor), 1), max(int(w * factor), 1)
    rows = box_resize_matrix(h, small_h)
    inside = rows > 0
    # Pillow's BOX puts each input row in one box, or (float rounding at a box edge) rarely in none or two.
    row_box = None
    if (inside.sum(axis=0) <= 1).all():
        row_box = torch.from_numpy(np.where(inside.any(axis=0), np.argmax(inside, axis=0), small_h)).to(device)
    columns = box_resize_matrix(w, small_w)[nearest_resize_index(small_w, w)]  # (W out, W in)
    blocks = []
    for first in range(0, w, _PIXELATE_BLOCK):
        last = min(w, first + _PIXELATE_BLOCK)
        used = np.flatnonzero(columns[first:last].any(axis=0))
        blocks.append((first, last, int(used[0]), int(used[-1]) + 1))
    return _PixelatePlan(
        small_h=small_h,
        boxes=small_h + int(not inside.any(axis=0).all()),
        row_box=row_box,
        rows=torch.from_numpy(rows).to(device, dtype),
        row_scale=torch.from_numpy(1.0 / inside.sum(axis=1)).view(-1, 1).to(device, dtype),
        columns_t=torch.from_numpy(np.ascontiguousarray(columns.T)).to(device, dtype),
        column_blocks=tuple(blocks),
        row_index=torch.from_numpy(nearest_resize_index(small_h, h)).to(device),
    )


@register_corruption("pixelate", PIXELATE_FACTOR, kind="digital")
def pixelate(images: Tensor, severity: int, draws: Mapping[str, Tensor]) -> Tensor:
    """Box-downsample by the severity's factor, then nearest-upsample back.

    Rows: each input row is added into its box (``index_add_``, one pass over the image) and the sums scaled to
    means. Columns: BOX down and NEAREST up are one (W, W) matrix, applied block by block over its band (each output
    column reads 2-4 input columns). Last, the downsampled rows are gathered into the output rows.
    """
    n, c, h, w = images.shape
    plan = _pixelate_plan(h, w, PIXELATE_FACTOR[severity - 1], images.dtype, images.device)
    out = torch.empty((n, c, h, w), dtype=images.dtype, device=images.device)
    chunk = min(n, _PIXELATE_CHUNK) * c
    rows_buffer = images.new_empty((chunk, plan.boxes, w))
    small_buffer = images.new_empty((chunk, plan.small_h, w))
    for start in range(0, n, _PIXELATE_CHUNK):
        flat = images[start : start + _PIXELATE_CHUNK].reshape(-1, h, w)
        if plan.row_box is None:
            rows = torch.matmul(plan.rows, flat)
        else:
            # An extra box, when needed, collects the rows that belong to none.
            rows = rows_buffer[: len(flat)].zero_().index_add_(1, plan.row_box, flat)[:, : plan.small_h]
            rows.mul_(plan.row_scale)
        small = small_buffer[: len(flat)]
        for first, last, lo, hi in plan.column_blocks:
            torch.matmul(rows[..., lo:hi], plan.columns_t[lo:hi, first:last], out=small[..., first:last])
        target = out[start : start + _PIXELATE_CHUNK].view(-1, h, w)
        torch.index_select(small.clamp_(0, 1), 1, plan.row_index, out=target)
    return out


@register_corruption("jpeg_compression", JPEG_QUALITY, kind="digital")
def jpeg_compression(images: Tensor, severity: int, draws: Mapping[str, Tensor]) -> Tensor:
    """Encode and decode as JPEG at quality 25..7 with Pillow (libjpeg, 4:2:0 chroma), image by image on the CPU.

    Pillow is the reference's own codec, so the output matches it bit for bit. Each image goes from its float planes
    to uint8 planes and back within the cache, and is decoded straight by the codec (``Image.frombytes``), skipping
    ``Image.open``'s Python marker parsing and chunked reads. torchvision's codec is no faster per image, and
    importing ``torchvision.io`` imports all of torchvision, torch._dynamo included: seconds on the first call in
    every worker process.
    """
    quality = JPEG_QUALITY[severity - 1]
    n, c, h, w = images.shape
    source = images.detach().to(device="cpu", dtype=torch.float32).numpy()
    out = torch.empty((n, c, h, w), dtype=torch.float32)
    result = out.numpy()
    scaled = np.empty((c, h, w), dtype=np.float32)
    levels = np.empty((c, h, w), dtype=np.uint8)
    for i in range(n):
        np.multiply(source[i], 255, out=scaled)
        np.clip(scaled, 0, 255, out=scaled)
        np.add(scaled, 0.5, out=levels, casting="unsafe")  # truncating cast: rounds half up
        planes = [Image.frombuffer("L", (w, h), plane, "raw", "L", 0, 1) for plane in levels]
        buffer = io.BytesIO()
        Image.merge("RGB", planes).save(buffer, format="JPEG", quality=quality)
        decoded = Image.frombytes("RGB", (w, h), buffer.getvalue(), "jpeg", "RGB", "")
        for channel, band in enumerate("RGB"):
            plane = np.frombuffer(decoded.tobytes("raw", band), dtype=np.uint8).reshape(h, w)
            np.divide(plane, np.float32(255), out=result[i, channel])
    return out.to(device=images.device, dtype=images.dtype)


def _draw_elastic(image: Tensor, severity: int, generator: torch.Generator) -> dict[str, Tensor]:
    h, w = image.shape[-2:]
    bound = h * ELASTIC_MAX_FRACTION
    # x (column) displacement first, then y, as the reference draws them.
    return {"raw": uniform(generator, -bound, bound, (2, h, w))}


@register_corruption("elastic_transform", ELASTIC_ALPHA, draw=_draw_elastic, kind="digital")
def elastic_transform(images: Tensor, severity: int, draws: Mapping[str, Tensor]) -> Tensor:
    """Resample along a smooth random displacement field (Gaussian-smoothed uniform noise times alpha).

    ``draws["raw"]`` is (N, 2, H, W): the unsmoothed x and y displacements. Sampling is bilinear with a mirrored
    border that repeats the edge pixel (scipy's ``reflect``; grid_sample's reflection without aligned corners).
    """
    n, _, h, w = images.shape
    alpha = ELASTIC_ALPHA[severity - 1]
    raw = draws["raw"].to(device=images.device, dtype=torch.float32)
    sigma = (h * ELASTIC_SIGMA_FRACTION, w * ELASTIC_SIGMA_FRACTION)
    shift = gaussian_filter(raw, sigma, mode="reflect", truncate=3.0) * alpha
    rows = torch.arange(h, device=images.device, dtype=torch.float64).view(1, h, 1)
    cols = torch.arange(w, device=images.device, dtype=torch.float64).view(1, 1, w)
    ys, xs = rows + shift[:, 1], cols + shift[:, 0]
    grid = torch.stack([(2 * xs + 1) / w - 1, (2 * ys + 1) / h - 1], dim=-1).to(images.dtype)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.clamp(0, 1)
