"""Generated class-dependent images and the photos scikit-image ships: the pixels of every test data set."""

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
    image: Image.Image, shape: str, color: str, rng: np.random.Generator, scale: tuple[float, float] = (0.45, 0.8)
) -> list[float]:
    """Draw one ``shape`` at a random place and size; return its COCO box ``[x, y, w, h]``."""
    width, height = image.size
    side = float(rng.uniform(*scale)) * min(width, height)
    x0 = float(rng.uniform(0, width - side))
    y0 = float(rng.uniform(0, height - side))
    x1, y1 = x0 + side, y0 + side
    fill = COLORS[color]
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        bar = side / 3
        draw.rectangle((x0, y0 + bar, x1, y1 - bar), fill=fill)
        draw.rectangle((x0 + bar, y0, x1 - bar, y1), fill=fill)
    elif shape == "ring":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
        inset = side * 0.3
        draw.ellipse((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=tuple(255 - c for c in fill))
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return [round(x0, 2), round(y0, 2), round(side, 2), round(side, 2)]


def generated_image(class_index: int, size: int | tuple[int, int], seed: int) -> np.ndarray:
    """A ``size`` image (uint8 HWC RGB) of class ``class_index``: its shape and colour on a random gradient."""
    rng = np.random.default_rng(seed)
    dims = (size, size) if isinstance(size, int) else size
    image = Image.fromarray(gradient_background(dims, rng))
    shape, color = class_style(class_index)
    draw_shape(image, shape, color, rng)
    return np.asarray(image)


def square_crop(pixels: np.ndarray, size: int, rng: np.random.Generator | None = None) -> np.ndarray:
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
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, format="JPEG", quality=quality)
    else:
        image.save(path, format="PNG")
