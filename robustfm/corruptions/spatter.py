"""Spatter: water drops (severities 1-3) or mud (4-5) from a blurred, thresholded Gaussian field.

Parameters are ``imagecorruptions`` 1.1.2's; the draw is the Gaussian liquid field (H, W). The water branch of the
reference is an OpenCV chain: Canny edges of the liquid layer, chamfer distance to them (5x5 mask), truncated at 20,
box blur, histogram equalisation, an emboss kernel and a last box blur give the drop shading. Each step is rebuilt
here in batched torch with OpenCV's integer rules (Sobel with replicated border, L1 gradient, its non-maximum
suppression comparisons, 8-connected hysteresis; the 5x5 chamfer weights 1 / 1.4 / 2.1969; uint8 truncation and
rounding where OpenCV stores uint8), so the result matches the reference pixel for pixel up to float rounding
(tests/unit/test_corruptions_parity.py).

The chamfer distance is computed exactly, in integer units of 1e-4 (all three weights are whole numbers of them), as
a composition of one-sided "ray" erosions (see :func:`chamfer_units`): about 75 cheap passes over the image instead
of 20 rounds of a 5x5 relaxation. The water branch runs a few images at a time so that its many passes stay in cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from robustfm.corruptions.base import register_corruption
from robustfm.corruptions.ops import gaussian_filter, pad2d

# (mean, std, blur sigma, threshold, intensity, mud?)
SPATTER_PARAMS = (
    (0.65, 0.3, 4, 0.69, 0.6, 0),
    (0.65, 0.3, 3, 0.68, 0.6, 0),
    (0.65, 0.3, 2, 0.68, 0.5, 0),
    (0.65, 0.3, 1, 0.65, 1.5, 1),
    (0.67, 0.4, 1, 0.65, 1.5, 1),
)
WATER_RGB = (175 / 255, 238 / 255, 238 / 255)  # pale turquoise
MUD_RGB = (63 / 255, 42 / 255, 20 / 255)
CANNY_LOW, CANNY_HIGH = 50, 150
DISTANCE_CAP = 20.0
_TAN_22_5_Q15 = 13573  # OpenCV's round(tan(22.5 deg) * 2^15)
_EMBOSS = ((-2, -1, 0), (-1, 1, 1), (0, 1, 2))
# OpenCV's DIST_L2 5x5 chamfer weights (axis move, diagonal move, knight move) in units of 1e-4.
CHAMFER_UNIT = 10_000
_AXIS, _DIAGONAL, _KNIGHT = 10_000, 14_000, 21_969
# The 16 chamfer moves (dy, dx, weight), paired so that each pair shares one linear ramp (see chamfer_units).
_MOVE_PAIRS = (
    ((1, 0, _AXIS), (0, 1, _AXIS)),
    ((-1, 0, _AXIS), (0, -1, _AXIS)),
    ((1, 1, _DIAGONAL), (1, -1, _DIAGONAL)),
    ((-1, 1, _DIAGONAL), (-1, -1, _DIAGONAL)),
    ((1, 2, _KNIGHT), (2, 1, _KNIGHT)),
    ((-1, -2, _KNIGHT), (-2, -1, _KNIGHT)),
    ((1, -2, _KNIGHT), (-2, 1, _KNIGHT)),
    ((-1, 2, _KNIGHT), (2, -1, _KNIGHT)),
)
_WATER_CHUNK = 4  # images per pass of the water branch: its int32 work buffers stay within a core's L2 cache


def _correlate3x3(images: Tensor, kernel: tuple[tuple[int, ...], ...], mode: str) -> Tensor:
    # Shifted-slice sums: a 1-channel 3x3 convolution is far slower than this on CPU.
    h, w = images.shape[-2:]
    padded = pad2d(images, (1, 1), (1, 1), mode)
    out = torch.zeros_like(images)
    for dy in range(3):
        for dx in range(3):
            if kernel[dy][dx]:
                out.add_(padded[..., dy : dy + h, dx : dx + w], alpha=kernel[dy][dx])
    return out


def _dilate3x3(mask: Tensor) -> Tensor:
    """Binary 3x3 dilation of a bool (N, 1, H, W) map, as separable shifted ORs."""
    h, w = mask.shape[-2:]
    padded = F.pad(mask.view(torch.uint8), (1, 1, 1, 1)).view(torch.bool)
    rows = padded[..., 0:h, :] | padded[..., 1 : h + 1, :] | padded[..., 2 : h + 2, :]
    return rows[..., 0:w] | rows[..., 1 : w + 1] | rows[..., 2 : w + 2]


def _below_sign(difference: Tensor) -> Tensor:
    """-1 where ``difference < 0``, else 0 (int16 masks: a sign shift and bitwise algebra are several times cheaper
    than comparisons and bool tensors on CPU)."""
    return difference.bitwise_right_shift_(15)


def canny(gray_u8: Tensor) -> Tensor:
    """OpenCV ``Canny(img, 50, 150)`` (aperture 3, L1 gradient) on uint8-valued (N, 1, H, W); bool edges.

    Gradients and magnitudes fit int16 (|g| <= 1020). Conditions are int16 masks (-1 true, 0 false) made from sign
    shifts of differences; OpenCV's fixed-point direction test becomes two per-pixel bounds on |gy| computed in
    int32, so it is exact as well.
    """
    h, w = gray_u8.shape[-2:]
    p = pad2d(gray_u8.to(torch.int16), (1, 1), (1, 1), "nearest")  # Sobel with BORDER_REPLICATE
    smooth_y = torch.add(p[..., 0:h, :], p[..., 2 : h + 2, :]).add_(p[..., 1 : h + 1, :], alpha=2)
    diff_y = p[..., 2 : h + 2, :] - p[..., 0:h, :]
    gx = smooth_y[..., 2 : w + 2] - smooth_y[..., 0:w]
    gy = torch.add(diff_y[..., 0:w], diff_y[..., 2 : w + 2]).add_(diff_y[..., 1 : w + 1], alpha=2)
    ax, ay = gx.abs(), gy.abs()
    mag = ax + ay
    padded = F.pad(mag, (1, 1, 1, 1))  # OpenCV pads the magnitude with zeros for suppression

    def above(dy: int, dx: int, strict: bool = True) -> Tensor:
        difference = padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] - mag
        return _below_sign(difference if strict else difference.sub_(1))

    # OpenCV's direction test in Q15, T = round(tan(22.5) 2^15): horizontal if |gy| 2^15 < |gx| T, i.e. |gy| at most
    # floor((|gx| T - 1) / 2^15); vertical if |gy| 2^15 > |gx| (T + 2^16), i.e. |gy| > floor(|gx| (T + 2^16) / 2^15).
    ax32 = ax.to(torch.int32)
    horizontal_top = (ax32 * _TAN_22_5_Q15).sub_(1).bitwise_right_shift_(15).to(torch.int16)
    vertical_bottom = (ax32 * (_TAN_22_5_Q15 + (1 << 16))).bitwise_right_shift_(15).to(torch.int16)
    horizontal = _below_sign((ay - horizontal_top).sub_(1))
    vertical = _below_sign(vertical_bottom - ay)
    diagonal = ~(horizontal | vertical)
    same_sign = ~_below_sign(gx ^ gy)  # OpenCV: s = (xs ^ ys) < 0 ? -1 : 1
    # A maximum is strictly above the first neighbour along the gradient and at least the second one (strictly
    # above both on diagonals).
    maximum = (horizontal & above(0, -1) & above(0, 1, strict=False)) | (
        vertical & above(-1, 0) & above(1, 0, strict=False)
    )
    maximum |= diagonal & same_sign & above(-1, -1) & above(1, 1)
    maximum |= diagonal & ~same_sign & above(-1, 1) & above(1, -1)
    candidate = maximum & _below_sign(CANNY_LOW - mag)
    edges = (candidate & _below_sign(CANNY_HIGH - mag)).bool()
    candidate = candidate.bool()
    # Hysteresis: grow strong edges into 8-connected candidates until nothing changes.
    while True:
        grown = candidate & _dilate3x3(edges)
        if torch.equal(grown, edges):
            return edges
        edges = grown


def _ramp(move_a: tuple[int, int, int], move_b: tuple[int, int, int]) -> tuple[int, int]:
    """(a, b) with a*dy + b*dx equal to each move's weight: r(y, x) = a*y + b*x grows by the weight along both."""
    (ya, xa, wa), (yb, xb, wb) = move_a, move_b
    det = ya * xb - xa * yb
    a, b = wa * xb - xa * wb, ya * wb - wa * yb
    if a % det or b % det:
        raise AssertionError(f"chamfer moves {move_a} and {move_b} share no integer ramp")
    return a // det, b // det


@lru_cache(maxsize=8)
def _doubling_steps(weight: int, cap: int) -> tuple[int, ...]:
    """Shifts 1, 2, 4, ... (the last one cut short) whose windows cover every count of moves costing below ``cap``."""
    most, covered, step, steps = -(-cap // weight) - 1, 0, 1, []
    while covered < most:
        steps.append(min(step, most - covered))
        covered += steps[-1]
        step *= 2
    return tuple(steps)


def _chamfer_pad(cap: int) -> int:
    """How far outside the image the shifted windows of :func:`chamfer_units` reach."""
    shifts = [
        step * max(abs(dy), abs(dx))
        for pair in _MOVE_PAIRS
        for dy, dx, weight in pair
        for step in _doubling_steps(weight, cap)
    ]
    return max(shifts, default=0)


def chamfer_units(zero_mask: Tensor, cap: int) -> Tensor:
    """``min(cap, OpenCV distanceTransform(DIST_L2, 5))`` to the ``zero_mask`` pixels, exactly, in 1e-4 units (int32).

    The chamfer distance is the cheapest path of moves (axis 1, diagonal 1.4, knight 2.1969) from an edge pixel. It
    is the composition of 16 one-sided ray erosions ``D(p) <- min_n D(p - n u) + n w``, one per move ``u`` of weight
    ``w`` (paths may take their moves in any order, and the cheapest ones stay in the box between their ends, so
    the border needs no special case). Subtracting a linear ramp ``r`` that grows by ``w`` along ``u`` turns a ray
    erosion into a plain running minimum along ``u``, done by doubling: ``E <- min(E, E shifted by s u)`` for
    ``s = 1, 2, 4, ...``, as far as a path cheaper than ``cap`` can go. Two moves share each ramp. Distances are
    whole numbers of 1e-4, so integers make them exact in any order of the moves (OpenCV sums float32).
    """
    n, _, h, w = zero_mask.shape
    pad = _chamfer_pad(cap)
    # |ramp| stays below 2 * 2.2 * size units; int32 while that and the pad marker (2^30) stay far apart.
    dtype = torch.int32 if 2 * _KNIGHT * max(h, w) < 2**28 else torch.int64
    far = 2**30 if dtype == torch.int32 else 2**60  # the pad: never the smaller of two values
    current = torch.full((n, 1, h + 2 * pad, w + 2 * pad), far, dtype=dtype, device=zero_mask.device)
    spare = current.clone()

    def inner(t: Tensor, dy: int = 0, dx: int = 0) -> Tensor:
        return t[..., pad - dy : pad - dy + h, pad - dx : pad - dx + w]

    ys = torch.arange(h, dtype=dtype, device=zero_mask.device).view(h, 1)
    xs = torch.arange(w, dtype=dtype, device=zero_mask.device).view(1, w)
    inner(current).copy_(~zero_mask).mul_(cap)
    ramp_a = ramp_b = 0  # current holds D - (ramp_a * y + ramp_b * x) inside the pad
    for pair in _MOVE_PAIRS:
        a, b = _ramp(*pair)
        inner(current).add_((ramp_a - a) * ys + (ramp_b - b) * xs)
        ramp_a, ramp_b = a, b
        for dy, dx, weight in pair:
            for s in _doubling_steps(weight, cap):
                torch.minimum(inner(current), inner(current, s * dy, s * dx), out=inner(spare))
                current, spare = spare, current
    return inner(current) + (ramp_a * ys + ramp_b * xs)


def chamfer_distance(zero_mask: Tensor, cap: float) -> Tensor:
    """``min(cap, OpenCV distanceTransform(DIST_L2, 5))`` to the ``zero_mask`` pixels, float32 (N, 1, H, W)."""
    units = chamfer_units(zero_mask, int(round(cap * CHAMFER_UNIT)))
    return units.to(torch.float32) / CHAMFER_UNIT


def equalize_hist(u8: Tensor) -> Tensor:
    """OpenCV ``equalizeHist`` per image on uint8-valued (N, 1, H, W), same dtype out."""
    n = u8.shape[0]
    # One histogram and one table lookup for the whole batch: image i's levels are offset by 256 i.
    offsets = torch.arange(0, n * 256, 256, dtype=torch.int32, device=u8.device).view(n, 1)
    index = (u8.reshape(n, -1).to(torch.int32) + offsets).view(-1)
    total = index.numel() // n
    hist = torch.bincount(index, minlength=n * 256).view(n, 256)
    first = (hist > 0).int().argmax(dim=1, keepdim=True)  # lowest level present
    first_count = hist.gather(1, first)
    # OpenCV keeps the scale in float32 and rounds sum * scale; the lowest level and those below map to 0.
    scale = (255.0 / (total - first_count).clamp(min=1).double()).to(torch.float32)
    lut = torch.round((hist.cumsum(1) - first_count).to(torch.float32) * scale).clamp_(0, 255)
    lut = torch.where(torch.arange(256, device=u8.device).view(1, 256) <= first, 0.0, lut)
    lut = torch.where(first_count == total, first.to(lut.dtype), lut)  # a flat image keeps its one level
    return lut.view(-1).index_select(0, index).view(u8.shape).to(u8.dtype)


def _box3_sum(images: Tensor) -> Tensor:
    """3x3 sums with BORDER_REFLECT_101 (OpenCV ``blur(img, (3, 3))`` times 9), as separable slice sums."""
    h, w = images.shape[-2:]
    padded = pad2d(images, (1, 1), (1, 1), "mirror")
    rows = padded[..., 0:h, :] + padded[..., 1 : h + 1, :] + padded[..., 2 : h + 2, :]
    return rows[..., 0:w] + rows[..., 1 : w + 1] + rows[..., 2 : w + 2]


def water_shading(liquid_u8: Tensor) -> Tensor:
    """The reference's drop shading ``dist`` (uint8-valued float32, (N, 1, H, W)) from the uint8-valued liquid layer.

    Every value below is a whole number (of 1e-4 for the distance) under 2^24, so float32 holds it exactly, and
    float32 division then floor gives the exact integer quotients (cheaper than integer division on CPU).
    """
    distance = chamfer_units(canny(liquid_u8), int(DISTANCE_CAP * CHAMFER_UNIT)).to(torch.float32)
    # float32 blur stored with astype(uint8): the floor of the exact mean (OpenCV's float32 sums only differ from it
    # within float rounding of a whole level).
    levels = torch.floor_(_box3_sum(distance).div_(9 * CHAMFER_UNIT))
    levels = equalize_hist(levels)
    embossed = _correlate3x3(levels, _EMBOSS, "mirror").clamp_(0, 255)  # filter2D to CV_8U saturates
    # Box blur on uint8 rounds; a sum of 9 whole numbers over 9 is never a tie.
    return torch.floor_(_box3_sum(embossed).add_(4.5).div_(9))


def _draw_liquid(image: Tensor, severity: int, generator: torch.Generator) -> dict[str, Tensor]:
    mean, std = SPATTER_PARAMS[severity - 1][:2]
    h, w = image.shape[-2:]
    # float32 normals, widened: torch's CPU sampler is vectorised for float32 only (float64 costs as much as the
    # rest of spatter). The field stays float64, as the thresholds downstream need.
    noise = torch.randn((h, w), generator=generator, dtype=torch.float32, device=generator.device)
    return {"field": noise.double().mul_(std).add_(mean)}


@register_corruption("spatter", SPATTER_PARAMS, draw=_draw_liquid, kind="weather")
def spatter(images: Tensor, severity: int, draws: Mapping[str, Tensor]) -> Tensor:
    """Water drops (severity 1-3) or mud splashes (4-5) shaped by ``draws["field"]`` (N, H, W)."""
    _, _, sigma, threshold, intensity, mud = SPATTER_PARAMS[severity - 1]
    field = draws["field"].to(images.device, torch.float64).unsqueeze(1)
    if mud:
        liquid = gaussian_filter(field, sigma)
        mask = gaussian_filter((liquid > threshold).to(torch.float32), intensity)
        mask = (mask * (mask >= 0.8)).to(images.dtype)
        colour = torch.tensor(MUD_RGB, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images * (1 - mask) + colour * mask).clamp(0, 1)
    colour = torch.tensor(WATER_RGB, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    out = torch.empty_like(images)
    for start in range(0, images.shape[0], _WATER_CHUNK):
        chunk = slice(start, start + _WATER_CHUNK)
        liquid = gaussian_filter(field[chunk], sigma)
        # The reference zeroes the layer below the threshold, then stores floor(255 * layer) as uint8.
        liquid_u8 = liquid.mul(255).mul_(liquid >= threshold).to(torch.int32).clamp_(max=255)
        # Its shading is float32: uint8 layer times uint8-valued float32 shading, over its maximum.
        shade = water_shading(liquid_u8).mul_(liquid_u8)
        shade.div_(shade.amax(dim=(2, 3), keepdim=True).clamp_(min=1e-12)).mul_(intensity)
        torch.add(images[chunk], (shade * colour).to(images.dtype), out=out[chunk]).clamp_(0, 1)
    return out
