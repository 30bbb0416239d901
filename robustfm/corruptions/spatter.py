"""Spatter: water drops (severities 1-3) or mud (4-5) from a blurred, thresholded Gaussian field.

Parameters are ``imagecorruptions`` 1.1.2's; the draw is the Gaussian liquid field (H, W). The water branch of the
reference is an OpenCV chain: Canny edges of the liquid layer, chamfer distance to them (5x5 mask), truncated at 20,
box blur, histogram equalisation, an emboss kernel and a last box blur give the drop shading. Each step is rebuilt
here in batched torch with OpenCV's integer rules (Sobel with replicated border, L1 gradient, its non-maximum
suppression comparisons, 8-connected hysteresis; the 5x5 chamfer weights 1 / 1.4 / 2.1969 summed in float32;
uint8 truncation and rounding where OpenCV stores uint8), so the result matches the reference pixel for pixel up to
float rounding (tests/unit/test_corruptions_parity.py).
"""

from __future__ import annotations

from collections.abc import Mapping

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
_EMBOSS = ((-2.0, -1.0, 0.0), (-1.0, 1.0, 1.0), (0.0, 1.0, 2.0))


def _correlate3x3(images: Tensor, kernel: tuple[tuple[float, ...], ...], mode: str) -> Tensor:
    # Shifted-slice sums: a 1-channel 3x3 convolution is far slower than this on CPU.
    h, w = images.shape[-2:]
    padded = pad2d(images, (1, 1), (1, 1), mode)
    out = torch.zeros_like(images)
    for dy in range(3):
        for dx in range(3):
            if kernel[dy][dx]:
                out.add_(padded[..., dy : dy + h, dx : dx + w], alpha=kernel[dy][dx])
    return out


def _window_reduce(x: Tensor, kh: int, kw: int, reduce, fill: float) -> Tensor:
    """``reduce`` (torch.minimum / torch.maximum) over a centred kh x kw window; outside counts as ``fill``.

    Separable slice reductions: CPU max_pool2d is several times slower on single-channel maps.
    """
    h, w = x.shape[-2:]
    if kh > 1:
        padded = F.pad(x, (0, 0, kh // 2, kh // 2), value=fill)
        x = padded[..., 0:h, :]
        for j in range(1, kh):
            x = reduce(x, padded[..., j : j + h, :])
    if kw > 1:
        padded = F.pad(x, (kw // 2, kw // 2), value=fill)
        x = padded[..., :, 0:w]
        for j in range(1, kw):
            x = reduce(x, padded[..., :, j : j + w])
    return x


def _min_pool(x: Tensor, kh: int, kw: int) -> Tensor:
    return _window_reduce(x, kh, kw, torch.minimum, float("inf"))


def canny(gray_u8: Tensor) -> Tensor:
    """OpenCV ``Canny(img, 50, 150)`` (aperture 3, L1 gradient) on uint8-valued float (N, 1, H, W); bool edges."""
    x = gray_u8.to(torch.float32)  # integer arithmetic below stays exact in float32
    gx = _correlate3x3(x, ((-1, 0, 1), (-2, 0, 2), (-1, 0, 1)), "nearest")
    gy = _correlate3x3(x, ((-1, -2, -1), (0, 0, 0), (1, 2, 1)), "nearest")
    mag = gx.abs() + gy.abs()
    padded = F.pad(mag, (1, 1, 1, 1))  # OpenCV pads the magnitude with zeros for suppression

    def neighbour(dy: int, dx: int) -> Tensor:
        h, w = mag.shape[-2:]
        return padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    ax, ay = gx.abs().double(), gy.abs().double() * (1 << 15)
    tg22 = ax * _TAN_22_5_Q15
    tg67 = tg22 + ax * (1 << 16)
    horizontal = ay < tg22
    vertical = ~horizontal & (ay > tg67)
    diagonal = ~horizontal & ~vertical
    same_sign = (gx >= 0) == (gy >= 0)  # OpenCV: s = (xs ^ ys) < 0 ? -1 : 1
    keep_h = (mag > neighbour(0, -1)) & (mag >= neighbour(0, 1))
    keep_v = (mag > neighbour(-1, 0)) & (mag >= neighbour(1, 0))
    keep_d_pos = (mag > neighbour(-1, -1)) & (mag > neighbour(1, 1))  # OpenCV: strict on both diagonal sides
    keep_d_neg = (mag > neighbour(-1, 1)) & (mag > neighbour(1, -1))
    keep_d = torch.where(same_sign, keep_d_pos, keep_d_neg)
    maximum = (horizontal & keep_h) | (vertical & keep_v) | (diagonal & keep_d)
    candidate = maximum & (mag > CANNY_LOW)
    edges = candidate & (mag > CANNY_HIGH)
    # Hysteresis: grow strong edges into 8-connected candidates until nothing changes (separable 3x3 dilation).
    while True:
        grown = candidate & (_window_reduce(edges.to(x.dtype), 3, 3, torch.maximum, 0.0) > 0)
        if torch.equal(grown, edges):
            return edges
        edges = grown


def chamfer_distance(zero_mask: Tensor, cap: float) -> Tensor:
    """``min(cap, OpenCV distanceTransform(DIST_L2, 5))`` to the ``zero_mask`` pixels.

    Relaxes ``d = min(d, d[neighbour] + weight)`` over the 5x5 chamfer neighbourhood (weights 1 for the 4 axis
    neighbours, 1.4 for the diagonals, 2.1969 for the knight moves) from ``d = cap`` off the mask until it stops
    changing: a path through a capped pixel never beats the cap, so the fixed point is the capped chamfer distance,
    and every path shorter than ``cap`` has fewer than ``cap`` hops. Each weight class is a min-pool over a box
    containing its moves: the box's other pixels are reachable more cheaply by the smaller moves, so they never win,
    and the pools are separable.
    """
    dist = torch.where(zero_mask, 0.0, float(cap)).to(torch.float32)
    for _ in range(int(cap) + 1):
        col3, row3 = _min_pool(dist, 3, 1), _min_pool(dist, 1, 3)
        best = torch.minimum(dist, torch.minimum(col3, row3) + 1.0)
        best = torch.minimum(best, _min_pool(col3, 1, 3) + 1.4)
        knight = torch.minimum(_min_pool(col3, 1, 5), _min_pool(row3, 5, 1))
        best = torch.minimum(best, knight + 2.1969)
        if torch.equal(best, dist):
            break
        dist = best
    return dist


def equalize_hist(u8: Tensor) -> Tensor:
    """OpenCV ``equalizeHist`` per image on uint8-valued float (N, 1, H, W)."""
    n = u8.shape[0]
    flat = u8.reshape(n, -1).long()
    total = flat.shape[1]
    out = []
    for i in range(n):
        hist = torch.bincount(flat[i], minlength=256).to(torch.float64)
        first = int(torch.nonzero(hist)[0])
        if hist[first] == total:
            out.append(torch.full_like(flat[i], first, dtype=u8.dtype))
            continue
        # OpenCV keeps the scale in float32 and rounds sum * scale.
        scale = torch.tensor(255.0 / float(total - hist[first]), dtype=torch.float32)
        lut = torch.round((torch.cumsum(hist, 0) - hist[first]).to(torch.float32) * scale).clamp(0, 255)
        lut[: first + 1] = 0
        out.append(lut.index_select(0, flat[i]).to(u8.dtype))
    return torch.stack(out).reshape(u8.shape)


def _box3(images: Tensor) -> Tensor:
    """OpenCV ``blur(img, (3, 3))``: 3x3 mean with BORDER_REFLECT_101, as separable slice sums."""
    h, w = images.shape[-2:]
    padded = pad2d(images, (1, 1), (1, 1), "mirror")
    rows = padded[..., 0:h, :] + padded[..., 1 : h + 1, :] + padded[..., 2 : h + 2, :]
    return (rows[..., 0:w] + rows[..., 1 : w + 1] + rows[..., 2 : w + 2]) / 9


def water_shading(liquid_u8: Tensor) -> Tensor:
    """The reference's drop shading ``dist`` (uint8-valued float64, (N, 1, H, W)) from the uint8 liquid layer."""
    edges = canny(liquid_u8)
    dist = chamfer_distance(edges, DISTANCE_CAP)
    dist = torch.floor(_box3(dist))  # float32 blur stored with astype(uint8)
    dist = equalize_hist(dist)
    dist = _correlate3x3(dist, _EMBOSS, "mirror").clamp(0, 255)  # filter2D to CV_8U saturates
    return torch.round(_box3(dist))  # box blur on uint8 rounds


def _draw_liquid(image: Tensor, severity: int, generator: torch.Generator) -> dict[str, Tensor]:
    mean, std = SPATTER_PARAMS[severity - 1][:2]
    h, w = image.shape[-2:]
    field = mean + std * torch.randn((h, w), generator=generator, dtype=torch.float64, device=generator.device)
    return {"field": field}


@register_corruption("spatter", SPATTER_PARAMS, draw=_draw_liquid, kind="weather")
def spatter(images: Tensor, severity: int, draws: Mapping[str, Tensor]) -> Tensor:
    """Water drops (severity 1-3) or mud splashes (4-5) shaped by ``draws["field"]`` (N, H, W)."""
    _, _, sigma, threshold, intensity, mud = SPATTER_PARAMS[severity - 1]
    liquid = gaussian_filter(draws["field"].to(images.device, torch.float64).unsqueeze(1), sigma)
    liquid = torch.where(liquid < threshold, torch.zeros_like(liquid), liquid)
    if mud:
        mask = gaussian_filter((liquid > threshold).to(torch.float32), intensity)
        mask = torch.where(mask < 0.8, torch.zeros_like(mask), mask).to(images.dtype)
        colour = torch.tensor(MUD_RGB, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images * (1 - mask) + colour * mask).clamp(0, 1)
    liquid_u8 = torch.floor(liquid * 255).clamp(0, 255)
    shade = liquid_u8 * water_shading(liquid_u8)
    shade = shade / shade.amax(dim=(2, 3), keepdim=True).clamp(min=1e-12) * intensity
    colour = torch.tensor(WATER_RGB, dtype=torch.float64, device=images.device).view(1, 3, 1, 1)
    return (images + (shade * colour).to(images.dtype)).clamp(0, 1)
