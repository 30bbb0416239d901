"""Nine everyday photometric edits for the embedding-robustness study (paper 004).

Paper 004 names JPEG quality, brightness and contrast and leaves the other six open; we chose six edits that photo
apps expose the same way (one slider each): saturation, hue, sharpness, Gaussian noise, Gaussian blur and
downscale-upscale. Every range contains its identity point, so a sweep passes through the clean image.

All edits are batched torch on float32 [0,1] images (N, 3, H, W), on any device, except JPEG: a real JPEG
encoder has no exact torch equivalent (its quantisation tables, chroma handling and rounding are the point of the
edit), so each image is encoded and decoded with Pillow on the CPU and moved back.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from robustfm.perturbations.registry import PERTURBATIONS, register_edit

Generators = Sequence[torch.Generator] | None


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    # ITU-R 601 luma, the weights Pillow and torchvision use for "L" images.
    r, g, b = images.unbind(dim=1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: float) -> torch.Tensor:
    # factor 1 returns `images`, 0 returns `other`, above 1 extrapolates away from `other`.
    return (other + factor * (images - other)).clamp(0.0, 1.0)


@register_edit(
    PERTURBATIONS,
    "jpeg_quality",
    low=10,
    high=100,
    identity=100,
    identity_atol=2 / 255,
    description="JPEG quality 10 (blocky) .. 100 (near lossless); Pillow, 4:4:4 chroma, round trip per image",
)
def jpeg_quality(images: torch.Tensor, value: float, generators: Generators = None) -> torch.Tensor:
    """JPEG encode-decode at ``quality = round(value)``.

    Chroma is kept at full resolution (4:4:4) at every quality so that quality 100 is the identity up to the 8-bit
    rounding and the DCT round trip (mean error < 1/255); quality is then the only knob of the sweep.
    """
    quality = int(round(value))
    pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    decoded = []
    for pixel_array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(pixel_array).save(buffer, format="JPEG", quality=quality, subsampling=0)
        buffer.seek(0)
        decoded.append(np.asarray(Image.open(buffer).convert("RGB")))
    out = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2)
    return out.to(device=images.device, dtype=images.dtype) / 255.0


@register_edit(
    PERTURBATIONS,
    "brightness",
    low=0.4,
    high=1.6,
    identity=1.0,
    description="brightness factor: pixels multiplied by it (0.4 darker .. 1.6 brighter), then clipped",
)
def brightness(images: torch.Tensor, value: float, generators: Generators = None) -> torch.Tensor:
    return (images * value).clamp(0.0, 1.0)


@register_edit(
    PERTURBATIONS,
    "contrast",
    low=0.4,
    high=1.6,
    identity=1.0,
    description="contrast factor: blend with the image's mean gray (0.4 flat .. 1.6 punchy), clipped",
)
def contrast(images: torch.Tensor, value: float, generators: Generators = None) -> torch.Tensor:
    mean_gray = _grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean_gray.expand_as(images), value)


@register_edit(
    PERTURBATIONS,
    "saturation",
    low=0.0,
    high=2.0,
    identity=1.0,
    description="saturation factor: blend with the per-pixel gray (0 grayscale .. 2 vivid), clipped",
)
def saturation(images: torch.Tensor, value: float, generators: Generators = None) -> torch.Tensor:
    return _blend(images, _grayscale(images).expand_as(images), value)


@register_edit(
    PERTURBATIONS,
    "hue",
    low=-0.5,
    high=0.5,
    identity=0.0,
    description="hue shift as a fraction of the colour circle (-0.5 .. 0.5 = -180 .. +180 degrees), in HSV",
)
def hue(images: torch.Tensor, value: float, generators: Generators = None) -> torch.Tensor:
    if value == 0.0:  # the HSV round trip costs ~1e-7 of float error; the identity should be exact
        return images.clone()
    return TF.adjust_hue(images, value).clamp(0.0, 1.0)


@register_edit(
    PERTURBATIONS,
    "sharpness",
    low=0.0,
    high=3.0,
    identity=1.0,
    description="sharpness factor: blend with a 3x3 smoothed copy (0 soft .. 1 original .. 3 oversharpened)",
)
def sharpness(images: torch.Tensor, value: float, generators: Generators = None) -> torch.Tensor:
    # Pillow's ImageEnhance.Sharpness, as torchvision implements it: border pixels keep their value.
    return TF.adjust_sharpness(images, value).clamp(0.0, 1.0)


@register_edit(
    PERTURBATIONS,
    "gaussian_noise",
    low=0.0,
    high=0.2,
    identity=0.0,
    random=True,
    description="standard deviation of additive Gaussian noise on [0,1] pixels (0 .. 0.2), then clipped",
)
def gaussian_noise(images: torch.Tensor, value: float, generators: Generators = None) -> torch.Tensor:
    """Adds N(0, value^2) noise; draws come from ``generators`` (one per image) so a sample's noise is reproducible."""
    if value == 0.0:
        return images.clone()
    shape = images.shape[1:]
    if generators is None:
        noise = torch.randn(images.shape, dtype=images.dtype)
    else:
        # Drawn on the CPU from each image's own generator: the same noise whatever the batch, device or worker.
        noise = torch.stack([torch.randn(shape, generator=g, dtype=images.dtype) for g in generators])
    return (images + value * noise.to(images.device)).clamp(0.0, 1.0)


@register_edit(
    PERTURBATIONS,
    "gaussian_blur",
    low=0.0,
    high=3.0,
    identity=0.0,
    description="Gaussian blur standard deviation in pixels (0 .. 3); kernel 2*ceil(3*sigma)+1, reflect pad",
)
def gaussian_blur(images: torch.Tensor, value: float, generators: Generators = None) -> torch.Tensor:
    if value == 0.0:
        return images.clone()
    radius = math.ceil(3 * value)
    # Reflect padding needs the kernel to fit in the image.
    radius = min(radius, (min(images.shape[-2:]) - 1) // 2)
    size = 2 * radius + 1
    return TF.gaussian_blur(images, [size, size], [value, value]).clamp(0.0, 1.0)


@register_edit(
    PERTURBATIONS,
    "downscale",
    low=0.1,
    high=1.0,
    identity=1.0,
    description="downscale-upscale: side ratio of the intermediate image (0.1 .. 1), antialiased bilinear",
)
def downscale(images: torch.Tensor, value: float, generators: Generators = None) -> torch.Tensor:
    height, width = images.shape[-2:]
    small = (max(1, round(height * value)), max(1, round(width * value)))
    if small == (height, width):
        return images.clone()
    reduced = TF.resize(images, list(small), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return TF.resize(reduced, [height, width], interpolation=TF.InterpolationMode.BILINEAR, antialias=True).clamp(0, 1)
