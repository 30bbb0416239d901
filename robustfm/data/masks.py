"""Per-image masks: checked and stored as 8-bit PNG by the converter, cropped and resized by the readers.

A mask is a single-channel 8-bit image of its image's size whose values are kept exactly: 0/255 foreground mattes,
0/1 masks, concept or class indices. The converter accepts 8-bit grayscale (``L``), bilevel (``1``, stored as
0/255) and palette (``P``, whose *indices* are the values, as in VOC-style segmentation files) images, and 16-bit
grayscale ones whose values all fit in 8 bits; anything else (colour, values above 255) is refused with
:data:`SkipReason.MASK_INVALID` rather than guessed at. Readers resize masks with nearest-neighbour sampling only,
so a transformed mask holds no value the stored one did not.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from robustfm.data.images import ImageDecodeError, SkipReason, _open


@dataclass(frozen=True)
class InspectedMask:
    """A mask as a shard stores it."""

    data: bytes
    """8-bit grayscale PNG bytes."""
    width: int
    height: int


def open_upright_mask(data: bytes, name: str = "<mask>") -> Image.Image:
    """The mask file as a PIL image with its EXIF orientation applied (as for images), in whatever mode it is stored.

    Raises:
        ImageDecodeError: :data:`SkipReason.MASK_INVALID` for undecodable files.
    """
    try:
        image = _open(data, name)
    except ImageDecodeError as err:
        raise ImageDecodeError(SkipReason.MASK_INVALID, f"{err.reason}: {err.detail}") from None
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001  (a corrupt EXIF block: keep the stored orientation)
        return image


def mask_values(data: bytes, name: str = "<mask>") -> np.ndarray:
    """Decode mask bytes into uint8 (H, W) values (EXIF orientation applied, as for images).

    Raises:
        ImageDecodeError: :data:`SkipReason.MASK_INVALID` for undecodable files, colour images and values above 255.
    """
    image = open_upright_mask(data, name)
    if image.mode == "1":
        return np.asarray(image.convert("L"))
    if image.mode in ("L", "P"):
        return np.asarray(image)  # for P: the palette indices are the values
    if image.mode.startswith("I"):
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 255):
            raise ImageDecodeError(
                SkipReason.MASK_INVALID,
                f"{name}: {image.mode} mask has values in [{values.min()}, {values.max()}]; masks are 8-bit (0..255)",
            )
        return values.astype(np.uint8)
    raise ImageDecodeError(
        SkipReason.MASK_INVALID, f"{name}: mode {image.mode} is not a single-channel mask (expected L, 1, P or I;16)"
    )


def inspect_mask(data: bytes, name: str = "<mask>") -> InspectedMask:
    """Check a mask file and return the 8-bit grayscale PNG a shard stores (values unchanged).

    Raises:
        ImageDecodeError: :data:`SkipReason.MASK_INVALID` (see :func:`mask_values`).
    """
    values = mask_values(data, name)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(values, dtype=np.uint8)).save(buffer, format="PNG", compress_level=6)
    return InspectedMask(buffer.getvalue(), values.shape[1], values.shape[0])


def decode_mask_crop_resize(
    data: bytes, box: Callable[[int, int], tuple[float, ...]], size: int, name: str = "<mask>"
) -> np.ndarray:
    """Crop ``box(width, height)`` of a mask and resize it to ``size`` x ``size`` with nearest-neighbour sampling.

    Nearest sampling picks, for every output pixel, the stored value under its centre: no value is invented, so
    binary masks stay binary. Returns uint8 (size, size).
    """
    values = mask_values(data, name)
    image = Image.fromarray(np.ascontiguousarray(values, dtype=np.uint8))
    return np.asarray(image.resize((size, size), Image.Resampling.NEAREST, box=box(image.width, image.height)))
