"""Weather corruptions: fog, frost and snow (spatter lives in spatter.py).

Parameters are ``imagecorruptions`` 1.1.2's. Draws:

- fog: the uniform draws of the plasma fractal (diamond-square heightmap), built for the batch by
  :func:`plasma_fractal`;
- frost: which of the first five frost images (the reference draws ``randint(5)``, so frost6 is never used) and the
  top-left corner of the crop in the rescaled frost image;
- snow: the Gaussian snow field (H, W) and the motion-blur angle in [-135, -45) degrees.

Frost images. They are photographs shipped inside the ``imagecorruptions`` package and are not part of robustfm.
:func:`frost_image_dir` finds them in the installed package without importing it (``pip install imagecorruptions``),
or in the directory named by ``$ROBUSTFM_FROST_DIR``; without either, frost raises :class:`FrostImagesMissingError`.
The reference resizes them with OpenCV's bicubic filter; here torch's bicubic (same a = -0.75 kernel, half-pixel
centres, clamped border) is rounded to uint8 like OpenCV's output, which agrees to within one grey level.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from robustfm.corruptions.base import randint, register_corruption, uniform
from robustfm.corruptions.ops import clipped_zoom, motion_blur_batch, rgb_to_gray

# (strength, wibble decay) of the plasma fractal
FOG_PARAMS = ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))
# (image weight, frost weight)
FROST_PARAMS = ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
FROST_CHOICES = 5  # the reference draws np.random.randint(5): frost6 is never used
# (mean, std, zoom, threshold, blur radius, blur sigma, image weight)
SNOW_PARAMS = (
    (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
    (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
    (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
    (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
    (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
)
SNOW_ANGLE = (-135.0, -45.0)


class FrostImagesMissingError(FileNotFoundError):
    """The frost photographs (from the imagecorruptions package) cannot be found."""


def next_power_of_2(x: int) -> int:
    return 1 if x == 0 else 2 ** (x - 1).bit_length()


def plasma_uniform_count(map_size: int) -> int:
    """How many uniform draws :func:`plasma_fractal` consumes for a map of side ``map_size``."""
    total, cells = 0, 1
    while cells <= map_size // 2:
        total += 3 * cells * cells  # squares, then the two diamond sets, each cells x cells
        cells *= 2
    return total


def plasma_fractal(map_size: int, wibble_decay: float, uniforms: Tensor) -> Tensor:
    """Diamond-square heightmaps in [0, 1], (N, map_size, map_size), as imagecorruptions builds them.

    ``uniforms`` is (N, :func:`plasma_uniform_count`) values in [0, 1): the reference's ``np.random.uniform`` draws
    in its order (per level: squares, then the two diamond sets; C order within each), so numpy's stream can be
    injected and compared exactly. Every sample of the batch is built at once.
    """
    if map_size & (map_size - 1):
        raise ValueError(f"plasma map size must be a power of two, got {map_size}")
    n = uniforms.shape[0]
    if uniforms.shape[1] != plasma_uniform_count(map_size):
        raise ValueError(f"plasma of side {map_size} needs {plasma_uniform_count(map_size)} uniforms per sample")
    uniforms = uniforms.to(torch.float64)
    grid = torch.zeros((n, map_size, map_size), dtype=torch.float64, device=uniforms.device)
    step, wibble, used = map_size, 100.0, 0

    def wibbled_mean(total: Tensor) -> Tensor:
        nonlocal used
        cells = total.shape[-1] * total.shape[-2]
        u = uniforms[:, used : used + cells].reshape(total.shape)
        used += cells
        # numpy's uniform(low, high) is low + (high - low) * u; the reference scales it by wibble again.
        return total / 4 + wibble * (-wibble + (2 * wibble) * u)

    while step >= 2:
        half = step // 2
        corners = grid[:, 0:map_size:step, 0:map_size:step]
        square = corners + torch.roll(corners, -1, 1)
        square = square + torch.roll(square, -1, 2)
        grid[:, half:map_size:step, half:map_size:step] = wibbled_mean(square)
        centres = grid[:, half:map_size:step, half:map_size:step]
        corners = grid[:, 0:map_size:step, 0:map_size:step]
        left = centres + torch.roll(centres, 1, 1) + corners + torch.roll(corners, -1, 2)
        grid[:, 0:map_size:step, half:map_size:step] = wibbled_mean(left)
        top = centres + torch.roll(centres, 1, 2) + corners + torch.roll(corners, -1, 1)
        grid[:, half:map_size:step, 0:map_size:step] = wibbled_mean(top)
        step //= 2
        wibble /= wibble_decay
    grid -= grid.amin(dim=(1, 2), keepdim=True)
    return grid / grid.amax(dim=(1, 2), keepdim=True).clamp(min=1e-300)  # a 1x1 map stays 0 instead of 0/0


def _draw_plasma(image: Tensor, severity: int, generator: torch.Generator) -> dict[str, Tensor]:
    size = next_power_of_2(max(image.shape[-2:]))
    count = plasma_uniform_count(size)
    return {"uniforms": torch.rand(count, generator=generator, dtype=torch.float64, device=generator.device)}


@register_corruption("fog", FOG_PARAMS, draw=_draw_plasma, kind="weather")
def fog(images: Tensor, severity: int, draws: Mapping[str, Tensor]) -> Tensor:
    """Add ``strength * plasma`` to every channel, then rescale by the image's maximum (per sample).

    ``draws["uniforms"]`` are the plasma fractal's uniform draws (see :func:`plasma_fractal`).
    """
    strength, decay = FOG_PARAMS[severity - 1]
    h, w = images.shape[-2:]
    plasma = plasma_fractal(next_power_of_2(max(h, w)), decay, draws["uniforms"].to(images.device))
    plasma = plasma[:, :h, :w].to(images.dtype).unsqueeze(1)
    max_val = images.amax(dim=(1, 2, 3), keepdim=True)
    return ((images + strength * plasma) * max_val / (max_val + strength)).clamp(0, 1)


def frost_image_dir() -> Path:
    """Directory holding frost1.png .. frost6.jpg: ``$ROBUSTFM_FROST_DIR`` or the installed imagecorruptions."""
    env = os.environ.get("ROBUSTFM_FROST_DIR")
    if env:
        candidates = [Path(env)]
    else:
        spec = importlib.util.find_spec("imagecorruptions")  # locates the package without importing it
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        candidates = [Path(p) / "frost" for p in locations]
    for directory in candidates:
        if all((directory / name).is_file() for name in FROST_FILES[:FROST_CHOICES]):
            return directory
    where = f"$ROBUSTFM_FROST_DIR={env}" if env else "the installed imagecorruptions package"
    raise FrostImagesMissingError(
        f"the frost corruption needs the frost images of the imagecorruptions package ({', '.join(FROST_FILES[:5])}), "
        f"not found in {where}. Install it with `pip install imagecorruptions`, or set ROBUSTFM_FROST_DIR to a "
        "directory holding those files."
    )


@lru_cache(maxsize=8)
def _frost_photo(index: int) -> np.ndarray:
    from PIL import Image

    with Image.open(frost_image_dir() / FROST_FILES[index]) as img:
        return np.asarray(img.convert("RGB"))  # alpha dropped without blending, as cv2.imread does


def _frost_scale(frost_hw: tuple[int, int], image_hw: tuple[int, int]) -> float:
    fh, fw = frost_hw
    h, w = image_hw
    # The reference enlarges the frost photo along the axes where it is smaller than the image (the larger factor
    # when both are), then by 10% in any case.
    if fh >= h and fw >= w:
        scale = 1.0
    elif fh < h and fw >= w:
        scale = h / fh
    elif fh >= h:
        scale = w / fw
    else:
        scale = max(h / fh, w / fw)
    return scale * 1.1


@lru_cache(maxsize=8)
def _frost_rescaled_shape(index: int, h: int, w: int) -> tuple[int, int]:
    fh, fw = _frost_photo(index).shape[:2]
    scale = _frost_scale((fh, fw), (h, w))
    return int(math.ceil(fh * scale)), int(math.ceil(fw * scale))


@lru_cache(maxsize=16)
def frost_layer(index: int, h: int, w: int) -> Tensor:
    """Frost photo ``index`` rescaled for an ``h`` x ``w`` image: uint8-valued float32 (3, H', W'), RGB."""
    photo = torch.from_numpy(_frost_photo(index).copy()).permute(2, 0, 1)[None].to(torch.float32)
    out = F.interpolate(photo, size=_frost_rescaled_shape(index, h, w), mode="bicubic", align_corners=False)
    return out[0].round().clamp(0, 255)


def _draw_frost(image: Tensor, severity: int, generator: torch.Generator) -> dict[str, Tensor]:
    h, w = image.shape[-2:]
    index = int(randint(generator, 0, FROST_CHOICES))
    fh, fw = _frost_rescaled_shape(index, h, w)
    top, left = int(randint(generator, 0, fh - h)), int(randint(generator, 0, fw - w))
    return {"index": torch.tensor(index), "top": torch.tensor(top), "left": torch.tensor(left)}


@register_corruption("frost", FROST_PARAMS, draw=_draw_frost, kind="weather")
def frost(images: Tensor, severity: int, draws: Mapping[str, Tensor]) -> Tensor:
    """Blend with a crop of a frost photograph: ``a * x + b * frost``."""
    image_weight, frost_weight = FROST_PARAMS[severity - 1]
    n, _, h, w = images.shape
    crops = []
    for i in range(n):
        layer = frost_layer(int(draws["index"][i]), h, w)
        top, left = int(draws["top"][i]), int(draws["left"][i])
        crops.append(layer[:, top : top + h, left : left + w])
    frost_batch = torch.stack(crops).to(device=images.device, dtype=images.dtype) / 255
    return (image_weight * images + frost_weight * frost_batch).clamp(0, 1)


def _draw_snow(image: Tensor, severity: int, generator: torch.Generator) -> dict[str, Tensor]:
    mean, std = SNOW_PARAMS[severity - 1][:2]
    h, w = image.shape[-2:]
    field = mean + std * torch.randn((h, w), generator=generator, dtype=torch.float64, device=generator.device)
    return {"field": field, "angle": uniform(generator, *SNOW_ANGLE)}


@register_corruption("snow", SNOW_PARAMS, draw=_draw_snow, kind="weather")
def snow(images: Tensor, severity: int, draws: Mapping[str, Tensor]) -> Tensor:
    """Zoomed, thresholded, motion-blurred snow flakes added twice (and rotated 180 degrees), over a whitened image."""
    _, _, zoom, threshold, radius, sigma, image_weight = SNOW_PARAMS[severity - 1]
    h, w = images.shape[-2:]
    # The flakes are computed in float64 like the reference, whose uint8 rounding below is sensitive to it.
    layer = clipped_zoom(draws["field"].to(images.device, torch.float64).unsqueeze(1), zoom)
    layer = torch.where(layer < threshold, torch.zeros_like(layer), layer).clamp(0, 1)
    layer = motion_blur_batch(layer, radius, sigma, draws["angle"])
    layer = (torch.round(layer * 255) / 255)[..., :h, :w].to(images.dtype)
    whitened = torch.maximum(images, rgb_to_gray(images) * 1.5 + 0.5)
    base = image_weight * images + (1 - image_weight) * whitened
    return (base + layer + torch.flip(layer, dims=(-2, -1))).clamp(0, 1)
