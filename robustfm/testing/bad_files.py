"""Every kind of awkward file a converter meets, written on demand, with what a correct decoder must make of it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from robustfm.data.images import SkipReason
from robustfm.testing.images import generated_image

BAD_FILE_KINDS = ("truncated", "zero_byte", "non_image", "cmyk", "palette", "grayscale", "sixteen_bit", "exif_rotated")
"""Every kind of awkward file the converter must handle."""
BAD_FILE_SKIP_REASON: dict[str, str | None] = {
    "truncated": SkipReason.TRUNCATED,
    "zero_byte": SkipReason.EMPTY,
    "non_image": SkipReason.NOT_AN_IMAGE,
    "cmyk": None,
    "palette": None,
    "grayscale": None,
    "sixteen_bit": None,
    "exif_rotated": None,
}
"""kind -> the skip reason the manifest must record, or None when the file must become a correct RGB image."""
_BAD_FILE_SUFFIX = {"palette": ".png", "sixteen_bit": ".png"}


def write_bad_files(
    directory: Path, size: int, seed: int, class_index: int = 0, prefix: str = "bad"
) -> dict[str, tuple[Path, np.ndarray | None]]:
    """Write one file of every :data:`BAD_FILE_KINDS` kind into ``directory``.

    Decodable ones show class ``class_index``. Returns kind -> (path, the RGB pixels it must decode to, or None
    for files that must be skipped).
    """
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[Path, np.ndarray | None]] = {}
    for offset, kind in enumerate(BAD_FILE_KINDS):
        path = directory / f"{prefix}_{kind}{_BAD_FILE_SUFFIX.get(kind, '.jpg')}"
        pixels = generated_image(class_index, size, seed + 7919 * (offset + 1))
        expected: np.ndarray | None = None
        if kind == "truncated":
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=92)
            path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        elif kind == "zero_byte":
            path.write_bytes(b"")
        elif kind == "non_image":
            path.write_text("this file has an image name but holds text\n")
        elif kind == "cmyk":
            Image.fromarray(pixels).convert("CMYK").save(path, format="JPEG", quality=95)
            expected = pixels
        elif kind == "palette":
            palette = Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
            palette.save(path, format="PNG")
            expected = np.asarray(palette.convert("RGB"))
        elif kind == "grayscale":
            gray = Image.fromarray(pixels).convert("L")
            gray.save(path, format="JPEG", quality=95)
            expected = np.repeat(np.asarray(gray)[..., None], 3, axis=2)
        elif kind == "sixteen_bit":
            gray8 = np.asarray(Image.fromarray(pixels).convert("L")).astype(np.uint16)
            Image.fromarray(gray8 * 257).save(path, format="PNG")  # full 16-bit range: 255 -> 65535
            expected = np.repeat(gray8.astype(np.uint8)[..., None], 3, axis=2)
        elif kind == "exif_rotated":
            # Upright image is wider than tall; the file stores it turned, with orientation 6 ("rotate 90 CW").
            upright = generated_image(class_index, (size, max(8, size // 2)), seed + 7919 * (offset + 1))
            stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
            exif = Image.Exif()
            exif[0x0112] = 6
            stored.save(path, format="JPEG", quality=95, exif=exif)
            expected = upright
        out[kind] = (path, expected)
    return out
