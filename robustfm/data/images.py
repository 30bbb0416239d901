"""Robust image decoding: whatever the file, either correct RGB pixels or a named reason to skip it.

Real collections hold CMYK JPEGs, palette PNGs (some with transparency), grayscale and 16-bit files, photos whose
orientation lives in an EXIF tag, and files that are truncated, empty or not images at all. :func:`load_rgb` turns
every decodable one into an upright 8-bit RGB ``PIL.Image``; :func:`inspect_image` does the same for the converter
and says why a file is skipped (:class:`SkipReason`) instead of raising.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats whose bytes a shard keeps unchanged when the image is already upright 8-bit RGB; anything else is
# re-encoded losslessly as PNG so that readers (and plain PIL loops) need no special cases.
_PASSTHROUGH_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})
_EXIF_ORIENTATION = 0x0112


class SkipReason:
    """Reason codes recorded in the manifest for files that cannot become an image."""

    EMPTY = "empty_file"
    TRUNCATED = "truncated"
    NOT_AN_IMAGE = "not_an_image"
    TOO_LARGE = "too_large"
    UNREADABLE = "unreadable"
    """The file exists but the storage refused to read it (permissions, I/O error)."""
    DECODE_ERROR = "decode_error"
    """The header parsed but the pixel data did not decode (corrupt stream that is not merely cut short)."""
    MASK_MISSING = "mask_missing"
    """``source.masks`` is set and the mask tree has no mask for this image (never replaced by an empty mask)."""
    MASK_SIZE_MISMATCH = "mask_size_mismatch"
    """The image's mask has another size than the (upright) image."""
    MASK_INVALID = "mask_invalid"
    """The mask file is not a decodable single-channel 8-bit image."""


class ImageDecodeError(ValueError):
    """A file that cannot be decoded into an image. ``reason`` is a :class:`SkipReason` code."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def _scale_high_bit_depth(image: Image.Image) -> Image.Image:
    # PIL's convert("L") clips 16/32-bit values at 255 (almost everything turns white); rescale instead.
    pixels = np.asarray(image)
    if image.mode.startswith("I;16") or pixels.max(initial=0) > 255:
        maximum = 65535.0 if pixels.max(initial=0) <= 65535 else float(pixels.max())
        pixels = np.clip(pixels.astype(np.float64) * (255.0 / maximum), 0, 255).round().astype(np.uint8)
    else:
        pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="L")


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return _scale_high_bit_depth(image).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels have arbitrary colour underneath; put them on white, as a viewer shows them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # CMYK (Adobe-inverted JPEGs included: PIL undoes the inversion), L, 1, P, YCbCr, LAB, HSV.
    return image.convert("RGB")


def _open(data: bytes, name: str, load: bool = True) -> Image.Image:
    """Open (and with ``load``, decode) encoded bytes; every failure becomes an :class:`ImageDecodeError`."""
    if len(data) == 0:
        raise ImageDecodeError(SkipReason.EMPTY, f"{name} has 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if load:
                image.load()
    except UnidentifiedImageError:
        raise ImageDecodeError(SkipReason.NOT_AN_IMAGE, f"{name} is not in any image format PIL reads") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError(SkipReason.TOO_LARGE, f"{name}: {err}") from None
    except OSError as err:
        raise _load_error(err, name) from None
    except (SyntaxError, ValueError, EOFError) as err:  # PIL's plugins raise these for corrupt headers
        raise ImageDecodeError(SkipReason.DECODE_ERROR, f"{name}: {err}") from None
    return image


def _load_error(err: OSError, name: str) -> ImageDecodeError:
    text = str(err).lower()
    reason = SkipReason.TRUNCATED if "truncated" in text or "premature end" in text else SkipReason.DECODE_ERROR
    return ImageDecodeError(reason, f"{name}: {err}")


def load_rgb(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Decode encoded bytes into an upright, 8-bit RGB image.

    EXIF orientation is applied; CMYK, palette (transparency composited on white), grayscale, 16-bit and
    32-bit images become 8-bit RGB (high bit depths are rescaled, not clipped).

    Raises:
        ImageDecodeError: with a :class:`SkipReason` code and ``name`` in the message.
    """
    image = _open(data, name)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as err:  # a corrupt EXIF block must not lose an otherwise good image
        warnings.warn(f"{name}: ignoring unreadable EXIF orientation ({err})", stacklevel=2)
    return _to_rgb(image)


@dataclass(frozen=True)
class InspectedImage:
    """A decodable image as the converter stores it."""

    data: bytes
    """Bytes that ``PIL.Image.open(...).convert("RGB")`` decodes to the correct upright RGB image."""
    width: int
    """Width after EXIF rotation."""
    height: int
    """Height after EXIF rotation."""
    reencoded: bool
    """True when the original bytes needed conversion (CMYK, palette, 16-bit, EXIF-rotated, other formats)."""


def inspect_image(data: bytes, name: str = "<bytes>") -> InspectedImage:
    """Check that ``data`` decodes fully and return the bytes a shard should store.

    Already-upright 8-bit RGB JPEG/PNG/WebP files are kept byte for byte; everything else decodable is converted
    with :func:`load_rgb` and stored as lossless PNG.

    Raises:
        ImageDecodeError: for files to skip (empty, truncated, not an image, too large, undecodable).
    """
    image = _open(data, name)
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    if image.format in _PASSTHROUGH_FORMATS and image.mode == "RGB" and orientation in (1, None):
        return InspectedImage(data, image.width, image.height, reencoded=False)
    rgb = load_rgb(data, name)
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG", compress_level=1)
    return InspectedImage(buffer.getvalue(), rgb.width, rgb.height, reencoded=True)


def decode_crop_resize(
    data: bytes,
    box: Callable[[int, int], tuple[float, ...]],
    size: int,
    name: str = "<bytes>",
) -> np.ndarray:
    """Decode, crop ``box(width, height)`` (left, top, right, bottom in upright pixels) and resize it to
    ``size`` x ``size`` with bicubic filtering. Returns uint8 HWC RGB.

    JPEGs are decoded at a reduced scale (libjpeg's DCT scaling via ``draft``) when the crop is still at least
    twice the output size, which saves most of the decode time for large photos at no visible cost. The box is
    scaled with the decoded image, so it covers the same part of the picture either way (masks cropped with the
    same box stay aligned).

    Raises:
        ImageDecodeError: with the :class:`SkipReason` of an undecodable file.
    """
    image = _open(data, name, load=False)
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    if image.format != "JPEG" or orientation not in (1, None):
        rgb = load_rgb(data, name)
        return np.asarray(rgb.resize((size, size), Image.Resampling.BICUBIC, box=box(rgb.width, rgb.height)))
    width, height = image.size
    left, top, right, bottom = box(width, height)
    reduction = min(right - left, bottom - top) / size
    if reduction >= 2:
        image.draft("RGB", (max(1, int(width / reduction)), max(1, int(height / reduction))))
    scale_x, scale_y = image.size[0] / width, image.size[1] / height
    try:
        image.load()
    except OSError as err:
        raise _load_error(err, name) from None
    except (SyntaxError, ValueError, EOFError) as err:
        raise ImageDecodeError(SkipReason.DECODE_ERROR, f"{name}: {err}") from None
    scaled = (left * scale_x, top * scale_y, right * scale_x, bottom * scale_y)
    return np.asarray(_to_rgb(image).resize((size, size), Image.Resampling.BICUBIC, box=scaled))
