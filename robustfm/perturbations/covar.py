"""COVAR (paper 002 §4, A.6): controlled variants of one object, each a function of (sample, background, variant).

COVAR places every base image's foreground on 20 backgrounds ("Bg-varied"), then derives structured variants of
each Bg-varied image: horizontal and vertical flips, a translation, a centre crop, a rotation, scales and viewpoints.
Accuracy per subset, compared with the Bg-varied subset, separates background reliance from other failure modes.

Offline stand-ins for the paper's generative steps (COVAR-offline numbers are not comparable with its Tables 3-4):

- Bg-varied: the masked foreground composited exactly onto a background image, instead of an Emu2 edit;
- translate / rotation: uncovered borders are black (0) instead of Stable-Diffusion inpainted;
- scale: the composite shrunk by a side factor in :data:`SCALE_FACTORS` (our reading of "up to 8x", 4 scales) and
  pasted onto the same background (or black) instead of outpainted, so the scene's context repeats around the object;
- viewpoint: none; it needs a novel-view model (Zero123++) that is not available offline.

Every draw is seeded by :func:`variant_seed`, so a sample's variants are the same on any worker and in any run. The
masks follow the image's geometry with nearest sampling, so they stay {0, 1}. The ``translate`` and ``scale``
entries of ``GEOMETRIC_VARIANTS`` keep their meaning (one diagonal shift value; a centred shrink onto black): COVAR
draws its own two-axis parameters here instead of changing them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from robustfm.registry import did_you_mean
from robustfm.seeding import sample_seed

COVAR_VARIANTS: tuple[str, ...] = ("hflip", "vflip", "translate", "crop", "rotation", "scale")
SCALE_FACTORS: tuple[int, ...] = (2, 4, 6, 8)
CANVASES = ("background", "black")

TRANSLATE_RANGE = (-0.2, 0.2)  # fraction of the width (dx) and height (dy), drawn independently (A.6)
CROP_AREA_RANGE = (0.6, 0.9)  # fraction of the area kept by the centre crop (A.6)
ROTATION_RANGE = (-45.0, 45.0)  # degrees, positive = counter-clockwise (torchvision's convention)

# NEAREST_EXACT samples pixel centres, as the bilinear image resize does; legacy NEAREST would shift the mask by up to
# half a source pixel towards the top-left relative to the image.
_MASK_RESIZE = TF.InterpolationMode.NEAREST_EXACT
_BILINEAR = TF.InterpolationMode.BILINEAR

Row = tuple[str, str, torch.Tensor, torch.Tensor]


def composite(image: torch.Tensor, mask: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """The Bg-varied image: ``image`` where the mask is 1, ``background`` elsewhere; no blending, so the foreground
    pixels are bit-exact copies.

    Args:
        image: (3, H, W) or (N, 3, H, W) in [0, 1].
        mask: (1, H, W) or (N, 1, H, W), values {0, 1} (anything above 0.5 counts as foreground).
        background: the same shape as ``image``.

    Raises:
        ValueError: when the shapes do not match; the message names all three.
    """
    expected_mask = (*image.shape[:-3], 1, *image.shape[-2:])
    if image.dim() not in (3, 4) or background.shape != image.shape or tuple(mask.shape) != expected_mask:
        raise ValueError(
            f"composite needs image (3,H,W) or (N,3,H,W), mask {expected_mask} and background of the image's shape; "
            f"got image {tuple(image.shape)}, mask {tuple(mask.shape)}, background {tuple(background.shape)}"
        )
    return torch.where(mask > 0.5, image, background)


def variant_seed(sample_id: str, background_id: str, variant: str, seed: int = 0) -> int:
    """The seed of one (sample, background, variant) draw under run seed ``seed``; a hash of the strings (blake2b via
    :func:`robustfm.seeding.sample_seed`), so it is the same in every process, unlike Python's salted ``hash()``."""
    return sample_seed(sample_id, 0, f"covar\x1f{background_id}\x1f{variant}", run_seed=seed)


def _check_variant(variant: str) -> None:
    if variant not in COVAR_VARIANTS:
        raise ValueError(
            f"unknown COVAR variant {variant!r}{did_you_mean(variant, COVAR_VARIANTS)} "
            f"(valid: {', '.join(COVAR_VARIANTS)})"
        )


def draw_params(variant: str, seed: int) -> dict[str, float]:
    """Draw one image's parameters of ``variant`` from a generator seeded with ``seed``.

    Returns ``{}`` for flips; ``dx``, ``dy`` (fractions of W, H) for translate; ``area`` for crop; ``degrees`` for
    rotation; ``factor`` (one of :data:`SCALE_FACTORS`) and ``fx``, ``fy`` (where the shrunk image sits: the fraction
    of the free space left of / above it) for scale.

    Raises:
        ValueError: for a name outside :data:`COVAR_VARIANTS`.
    """
    _check_variant(variant)
    generator = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    if variant == "translate":
        return {"dx": uniform(*TRANSLATE_RANGE), "dy": uniform(*TRANSLATE_RANGE)}
    if variant == "crop":
        return {"area": uniform(*CROP_AREA_RANGE)}
    if variant == "rotation":
        return {"degrees": uniform(*ROTATION_RANGE)}
    if variant == "scale":
        index = int(torch.randint(len(SCALE_FACTORS), (), generator=generator))
        return {"factor": float(SCALE_FACTORS[index]), "fx": uniform(0.0, 1.0), "fy": uniform(0.0, 1.0)}
    return {}


def _resize_pair(image: torch.Tensor, mask: torch.Tensor, size: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    resized = TF.resize(image, size, interpolation=_BILINEAR, antialias=True).clamp(0.0, 1.0)
    return resized, TF.resize(mask, size, interpolation=_MASK_RESIZE)


def _shift(tensor: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Whole-pixel shift (positive: right / down) with zero fill; negative padding on the far side crops it back."""
    height, width = tensor.shape[-2:]
    dx, dy = max(-width, min(width, dx)), max(-height, min(height, dy))
    return F.pad(tensor, (dx, -dx, dy, -dy), value=0.0)


def _paste_shrunk(
    image: torch.Tensor, mask: torch.Tensor, params: Mapping[str, float], canvas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink by the side factor and paste at (fx, fy) of the free space onto ``canvas``; the mask onto zeros."""
    height, width = image.shape[-2:]
    factor = int(params["factor"])
    small_h, small_w = max(1, height // factor), max(1, width // factor)
    top, left = round(params["fy"] * (height - small_h)), round(params["fx"] * (width - small_w))
    small_image, small_mask = _resize_pair(image, mask, [small_h, small_w])
    out_image, out_mask = canvas.clone(), torch.zeros_like(mask)
    out_image[..., top : top + small_h, left : left + small_w] = small_image
    out_mask[..., top : top + small_h, left : left + small_w] = small_mask
    return out_image, out_mask


def apply_variant(
    image: torch.Tensor,
    mask: torch.Tensor,
    variant: str,
    params: Mapping[str, float],
    *,
    background: torch.Tensor | None = None,
    canvas: str = "background",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The structured variant of a Bg-varied image and its foreground mask, moved with the same geometry.

    Args:
        image: (3, H, W) in [0, 1], normally a :func:`composite`.
        mask: (1, H, W), values {0, 1}.
        variant: one of :data:`COVAR_VARIANTS`.
        params: from :func:`draw_params` for this variant.
        background: the canvas of ``scale`` when ``canvas == "background"`` (the image's own background, so the
            shrunk scene sits inside its context); ignored otherwise.
        canvas: ``"background"`` or ``"black"`` (zeros), for ``scale`` only.

    Returns:
        ``(image, mask)`` of the input shapes; areas the moved image no longer covers are 0 in both.

    Raises:
        ValueError: unknown variant or canvas, or ``scale`` on the background canvas without ``background``.
    """
    _check_variant(variant)
    if canvas not in CANVASES:
        raise ValueError(f"unknown canvas {canvas!r} (valid: {', '.join(CANVASES)})")
    height, width = image.shape[-2:]
    if variant in ("hflip", "vflip"):
        dim = -1 if variant == "hflip" else -2
        return image.flip(dim), mask.flip(dim)
    if variant == "translate":
        dx, dy = round(params["dx"] * width), round(params["dy"] * height)
        return _shift(image, dx, dy), _shift(mask, dx, dy)
    if variant == "crop":
        side = math.sqrt(params["area"])  # the aspect ratio is kept, so each side keeps sqrt(area)
        crop = [max(1, round(height * side)), max(1, round(width * side))]
        return _resize_pair(TF.center_crop(image, crop), TF.center_crop(mask, crop), [height, width])
    if variant == "rotation":
        angle = float(params["degrees"])
        rotated = TF.rotate(image, angle, interpolation=_BILINEAR, fill=[0.0]).clamp(0.0, 1.0)
        return rotated, TF.rotate(mask, angle, interpolation=TF.InterpolationMode.NEAREST, fill=[0.0])
    if canvas == "black":
        return _paste_shrunk(image, mask, params, torch.zeros_like(image))
    if background is None:
        raise ValueError("scale on canvas 'background' needs the background image (or use canvas='black')")
    if background.shape != image.shape:
        raise ValueError(f"background {tuple(background.shape)} must have the image's shape {tuple(image.shape)}")
    return _paste_shrunk(image, mask, params, background)


def _variant_params(sample_id: str, background_id: str, variant: str, seed: int) -> dict[str, float]:
    return draw_params(variant, variant_seed(sample_id, background_id, variant, seed))


def covar_rows(
    image: torch.Tensor,
    mask: torch.Tensor,
    backgrounds: Mapping[str, torch.Tensor],
    sample_id: str,
    *,
    variants: Sequence[str] = COVAR_VARIANTS,
    seed: int = 0,
    canvas: str = "background",
) -> list[Row]:
    """All COVAR rows of one base image as ``(label, background_id, image, mask)``.

    Order: ``("original", "", image, mask)``; then ``("bg_varied", bg, composite, mask)`` for every background id in
    sorted order; then ``(variant, bg, image, mask)`` for every background (sorted) and every variant in ``variants``
    order. That is ``1 + B * (1 + len(variants))`` rows, each a deterministic function of its ids and ``seed``.
    """
    for variant in variants:  # fail before any work, not after the first background
        _check_variant(variant)
    background_ids = sorted(backgrounds)
    composites = {bg: composite(image, mask, backgrounds[bg]) for bg in background_ids}
    rows: list[Row] = [("original", "", image, mask)]
    rows += [("bg_varied", bg, composites[bg], mask) for bg in background_ids]
    for bg in background_ids:
        for variant in variants:
            params = _variant_params(sample_id, bg, variant, seed)
            varied, varied_mask = apply_variant(
                composites[bg], mask, variant, params, background=backgrounds[bg], canvas=canvas
            )
            rows.append((variant, bg, varied, varied_mask))
    return rows


def variant_params_record(
    sample_id: str,
    backgrounds: Iterable[str],
    variants: Sequence[str] = COVAR_VARIANTS,
    seed: int = 0,
) -> list[dict]:
    """The drawn parameters of every (background, variant) of one sample, JSON-serialisable, in :func:`covar_rows`
    order, so that an exported COVAR-offline set can be regenerated or audited. ``backgrounds`` may be the mapping
    given to :func:`covar_rows` (its keys are used)."""
    return [
        {
            "sample_id": sample_id,
            "background_id": bg,
            "variant": variant,
            "seed": variant_seed(sample_id, bg, variant, seed),
            "params": _variant_params(sample_id, bg, variant, seed),
        }
        for bg in sorted(backgrounds)
        for variant in variants
    ]
