"""The geometric transforms of training and evaluation: one implementation for every reader.

A row's image, its masks and its other image columns (the two distortions of a 2AFC triplet) get one joint
transform: the crop box is drawn once, from the row's ``image``, and applied to every column in relative
coordinates, with the same flip. Images are resized bicubic, masks nearest (their values are never interpolated).

- **train**: a random-resized crop (area fraction ``crop_scale``, aspect in [3/4, 4/3]) and a horizontal flip with
  probability 1/2, both drawn from ``sample_seed(id, epoch, "crop", seed)``: a sample gets the same crop whatever
  block, batch, worker or rerun it lands in.
- **eval**: resize the shorter side to S (bicubic) and centre-crop S x S, done as one bicubic resize of the centred
  square (:data:`EVAL_PREPROCESSING`). Training-side validation (``ShardBatchSource(train=False)``), the evaluation
  suites (``robustfm.evals.data.decode_batch``) and anything else that needs eval pixels call :func:`eval_image` or
  :func:`transform_row`, so they cannot disagree.

Outputs: images float32 [3, S, S] in [0, 1]; masks uint8 [1, S, S] with the stored values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from robustfm.data.columns import ColumnKind
from robustfm.data.images import decode_crop_resize
from robustfm.data.masks import decode_mask_crop_resize
from robustfm.seeding import sample_seed

DEFAULT_CROP_SCALE = (0.9, 1.0)  # open_clip's fine-tuning default for RandomResizedCrop's area fraction
_RATIO = (3 / 4, 4 / 3)
EVAL_PREPROCESSING = (
    "decode RGB (EXIF-upright; large JPEGs DCT-downscaled to >= 2x the output first) -> resize the centred square of "
    "side min(width, height) to image_size x image_size (bicubic; = resize shorter side + center crop) -> [0,1]"
)
Box = tuple[float, float, float, float]


def random_resized_box(width: int, height: int, rng: np.random.Generator, scale: tuple[float, float]) -> Box:
    """A random crop box (left, top, right, bottom) of ``scale`` area fraction and aspect in [3/4, 4/3].

    Same distribution as torchvision's RandomResizedCrop, drawn from ``rng`` (10 tries, then a centred crop).
    """
    area = width * height
    log_ratio = (math.log(_RATIO[0]), math.log(_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = round(math.sqrt(target * aspect))
        crop_h = round(math.sqrt(target / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = int(rng.integers(0, width - crop_w + 1))
            top = int(rng.integers(0, height - crop_h + 1))
            return (left, top, left + crop_w, top + crop_h)
    aspect = width / height
    if aspect < _RATIO[0]:
        crop_w, crop_h = width, round(width / _RATIO[0])
    elif aspect > _RATIO[1]:
        crop_w, crop_h = round(height * _RATIO[1]), height
    else:
        crop_w, crop_h = width, height
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return (left, top, left + crop_w, top + crop_h)


def center_box(width: int, height: int) -> Box:
    """The centred square of side min(width, height): "resize the shorter side, then centre-crop"."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


class _JointBox:
    """Draws the box from the first image it is asked about, then maps it onto any other size proportionally."""

    def __init__(self, rng: np.random.Generator | None, crop_scale: tuple[float, float]) -> None:
        self.rng = rng
        self.crop_scale = crop_scale
        self.reference: tuple[int, int] | None = None
        self.box: Box | None = None

    def __call__(self, width: int, height: int) -> Box:
        if self.box is None or self.reference is None:
            self.reference = (width, height)
            if self.rng is None:
                self.box = center_box(width, height)
            else:
                self.box = random_resized_box(width, height, self.rng, self.crop_scale)
            return self.box
        ref_w, ref_h = self.reference
        if (width, height) == self.reference:
            return self.box
        sx, sy = width / ref_w, height / ref_h
        left, top, right, bottom = self.box
        return (left * sx, top * sy, right * sx, bottom * sy)


def _to_float(pixels: np.ndarray, flip: bool) -> np.ndarray:
    if flip:
        pixels = pixels[:, ::-1]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)


def transform_row(
    columns: Mapping[str, Any],
    kinds: Mapping[str, str],
    sample_id: str,
    image_size: int,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE,
    primary: str = "image",
) -> dict[str, np.ndarray]:
    """Decode the image and mask columns of one row with one joint geometric transform.

    Args:
        columns: column name -> encoded bytes (at least ``primary``).
        kinds: column name -> ``"image"`` or ``"mask"`` for the columns to decode (others are ignored).
        sample_id: the row's id (seeds the train transform).
        image_size: side S of the output.
        train: train (seeded crop + flip) or eval (centre crop) transform.
        seed, epoch, crop_scale: the train transform's draws (ignored in eval).
        primary: the image column the crop box is drawn from.

    Returns:
        name -> float32 [3, S, S] in [0, 1] (images) or uint8 [1, S, S] (masks), for ``primary`` and every
        decoded column present in ``columns``.

    Raises:
        ImageDecodeError: naming the sample and column of an undecodable image or mask.
    """
    rng = np.random.default_rng(sample_seed(sample_id, epoch, "crop", seed)) if train else None
    box = _JointBox(rng, tuple(crop_scale))
    label = f"sample {sample_id}"
    pixels = decode_crop_resize(bytes(columns[primary]), box, image_size, label)
    # The flip is drawn after the box (the order the draws have always had: seeded crops stay the same).
    flip = rng is not None and rng.random() < 0.5
    out = {primary: _to_float(pixels, flip)}
    for name, kind in kinds.items():
        if name == primary or name not in columns:
            continue
        where = f"{label} column {name!r}"
        if kind == ColumnKind.IMAGE:
            out[name] = _to_float(decode_crop_resize(bytes(columns[name]), box, image_size, where), flip)
        elif kind == ColumnKind.MASK:
            values = decode_mask_crop_resize(bytes(columns[name]), box, image_size, where)
            out[name] = np.ascontiguousarray(values[:, ::-1] if flip else values)[None]
    return out


def transform_image(data: bytes, *args: Any, **kwargs: Any) -> np.ndarray:
    """:func:`transform_row` of one encoded image: float32 [3, S, S] in [0, 1].

    Takes :func:`transform_row`'s arguments after ``kinds``: ``(sample_id, image_size, train, seed=0, epoch=0,
    crop_scale=DEFAULT_CROP_SCALE)``.
    """
    return transform_row({"image": data}, {"image": ColumnKind.IMAGE}, *args, **kwargs)["image"]


def eval_image(data: bytes, image_size: int, name: str = "<bytes>") -> np.ndarray:
    """The eval preprocessing (:data:`EVAL_PREPROCESSING`) of one encoded image: float32 [3, S, S] in [0, 1].

    Raises:
        ImageDecodeError: with the skip reason of an undecodable file.
    """
    box = _JointBox(None, DEFAULT_CROP_SCALE)
    return _to_float(decode_crop_resize(bytes(data), box, image_size, name), flip=False)
