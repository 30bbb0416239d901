"""Generated class-dependent images (with exact foreground masks) and the photos scikit-image ships.

The pixels of the demo data set (:mod:`robustfm.data.demo`) and of every test data set. A generated image is a
coloured shape on a random gradient; its mask marks every pixel a shape was painted on (255) against the
untouched background (0), exactly, because image and mask are rasterized from the same coordinates. The horse
images fill scikit-image's ``horse()`` silhouette with a photo texture; their mask is the silhouette.
scikit-image is imported only by the functions that use its photos.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "magenta": (200, 40, 200),
    "cyan": (40, 200, 210),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
_COLOR_NAMES = tuple(COLORS)

# name -> (COCO-style category, caption). Only photos bundled with scikit-image (no download).
PHOTOS = {
    "astronaut": ("person", "a photo of an astronaut in a spacesuit in front of a flag"),
    "chelsea": ("cat", "a photo of a ginger cat"),
    "coffee": ("cup", "a cup of coffee on a saucer"),
    "rocket": ("rocket", "a rocket on its launch pad"),
    "hubble_deep_field": ("galaxy", "a telescope image of distant galaxies"),
    "immunohistochemistry": ("tissue", "a microscope image of stained tissue"),
    "retina": ("retina", "a photo of the back of an eye"),
}


def class_style(index: int) -> tuple[str, str]:
    """(shape, colour) of generated class ``index``; distinct for the first 40 classes."""
    shape = SHAPES[index % len(SHAPES)]
    color = _COLOR_NAMES[(index + index // len(SHAPES)) % len(_COLOR_NAMES)]
    return shape, color


def class_name(index: int) -> str:
    """The folder / category name of generated class ``index`` (e.g. ``red_circle``)."""
    shape, color = class_style(index)
    return f"{color}_{shape}"


def gradient_background(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A noisy two-colour linear gradient, uint8 (height, width, 3) for ``size`` = (width, height)."""
    width, height = size
    start, end = rng.uniform(40, 200, size=(2, 3))
    ramp = (
        np.linspace(0.0, 1.0, width)[None, :, None]
        if rng.random() < 0.5
        else np.linspace(0.0, 1.0, height)[:, None, None]
    )
    pixels = start + (end - start) * ramp
    pixels = np.broadcast_to(pixels, (height, width, 3)) + rng.normal(0.0, 6.0, size=(height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def draw_shape(
    image: Image.Image,
    shape: str,
    color: str,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.45, 0.8),
    mask: Image.Image | None = None,
) -> list[float]:
    """Draw one ``shape`` at a random place and size; return its COCO box ``[x, y, w, h]``.

    Args:
        mask: an ``L`` image of the same size on which the painted pixels are set to 255 (the ring's painted
            centre included), pixel for pixel the ones painted on ``image``.
    """
    width, height = image.size
    side = float(rng.uniform(*scale)) * min(width, height)
    x0 = float(rng.uniform(0, width - side))
    y0 = float(rng.uniform(0, height - side))
    x1, y1 = x0 + side, y0 + side
    fill = COLORS[color]
    targets = [(ImageDraw.Draw(image), fill, tuple(255 - c for c in fill))]
    if mask is not None:
        targets.append((ImageDraw.Draw(mask), 255, 255))
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    for draw, paint, inner in targets:
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=paint)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=paint)
        elif shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=paint)
        elif shape == "cross":
            bar = side / 3
            draw.rectangle((x0, y0 + bar, x1, y1 - bar), fill=paint)
            draw.rectangle((x0 + bar, y0, x1 - bar, y1), fill=paint)
        else:  # ring
            draw.ellipse((x0, y0, x1, y1), fill=paint)
            inset = side * 0.3
            draw.ellipse((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=inner)
    return [round(x0, 2), round(y0, 2), round(side, 2), round(side, 2)]


def generated_image(class_index: int, size: int | tuple[int, int], seed: int) -> np.ndarray:
    """A ``size`` image (uint8 HWC RGB) of class ``class_index``: its shape and colour on a random gradient."""
    return generated_image_and_mask(class_index, size, seed)[0]


def generated_image_and_mask(class_index: int, size: int | tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`generated_image` and its exact foreground mask (uint8 HW: 255 on the shape, 0 elsewhere)."""
    rng = np.random.default_rng(seed)
    dims = (size, size) if isinstance(size, int) else size
    image = Image.fromarray(gradient_background(dims, rng))
    mask = Image.new("L", image.size, 0)
    shape, color = class_style(class_index)
    draw_shape(image, shape, color, rng, mask=mask)
    return np.asarray(image), np.asarray(mask)


def square_crop(pixels: np.ndarray, size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """A square crop of ``pixels`` resized to ``size`` (bicubic): the centred one, or with ``rng`` a random one."""
    height, width = pixels.shape[:2]
    side = min(height, width)
    if rng is None:
        top, left = (height - side) // 2, (width - side) // 2
    else:  # a random crop of 60-100 % of the short side: several distinct samples per photo
        side = int(side * rng.uniform(0.6, 1.0))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    crop = Image.fromarray(pixels[top : top + side, left : left + side])
    return np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC))


def real_photos(size: int) -> dict[str, np.ndarray]:
    """The colour photos bundled with scikit-image, centre-cropped square and resized to ``size`` (uint8 HWC)."""
    import skimage.data

    return {name: square_crop(getattr(skimage.data, name)(), size) for name in PHOTOS}


def save_image(pixels: np.ndarray, path: Path, quality: int = 92) -> None:
    """Write ``pixels`` as JPEG (``.jpg``/``.jpeg``, at ``quality``) or PNG, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, format="JPEG", quality=quality)
    else:
        image.save(path, format="PNG")


def horse_image_and_mask(
    size: int, rng: np.random.Generator, texture: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """scikit-image's ``horse()`` silhouette filled with ``texture`` on a random gradient.

    Args:
        size: side of the square image.
        texture: uint8 (size, size, 3) pixels shown inside the silhouette (e.g. :func:`square_crop` of a photo).

    Returns:
        The image (uint8 HWC), its exact mask (uint8 HW: 255 on the horse) and the horse's COCO box [x, y, w, h].
    """
    import skimage.data

    silhouette = Image.fromarray(np.where(skimage.data.horse(), 0, 255).astype(np.uint8))  # horse() is False on it
    scale = float(rng.uniform(0.6, 0.95)) * size / max(silhouette.size)
    width, height = max(1, round(silhouette.width * scale)), max(1, round(silhouette.height * scale))
    left, top = int(rng.integers(0, size - width + 1)), int(rng.integers(0, size - height + 1))
    mask = Image.new("L", (size, size), 0)
    mask.paste(silhouette.resize((width, height), Image.Resampling.NEAREST), (left, top))
    values = np.asarray(mask)
    pixels = np.where(values[..., None] > 0, texture, gradient_background((size, size), rng))
    rows, cols = np.nonzero(values)
    box = [float(cols.min()), float(rows.min()), float(cols.max() - cols.min() + 1), float(rows.max() - rows.min() + 1)]
    return pixels.astype(np.uint8), values, box


def save_mask(values: np.ndarray, path: Path) -> None:
    """Write a uint8 HW mask as an 8-bit grayscale PNG (lossless: values kept), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(values, dtype=np.uint8)).save(path, format="PNG")
