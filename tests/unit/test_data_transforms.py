"""The one joint geometric transform: image and masks aligned, mask values exact, one eval path for every caller."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from robustfm.data.images import ImageDecodeError, SkipReason
from robustfm.data.masks import inspect_mask, mask_values
from robustfm.data.transforms import eval_image, transform_image, transform_row
from robustfm.evals.data import decode_batch, eval_transform

KINDS = {"image": "image", "mask": "mask"}
SIZE = 32


def _encode(pixels: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _blob(width: int = 400, height: int = 300) -> np.ndarray:
    """An asymmetric foreground (an ellipse and a bar off to one side): a flip or a shifted crop shows."""
    yy, xx = np.mgrid[0:height, 0:width]
    ellipse = (xx - 0.37 * width) ** 2 / (0.22 * width) ** 2 + (yy - 0.4 * height) ** 2 / (0.2 * height) ** 2 < 1
    bar = (xx > 0.65 * width) & (xx < 0.82 * width) & (yy > 0.6 * height) & (yy < 0.93 * height)
    return ellipse | bar


def _image_and_mask(fmt: str) -> tuple[bytes, bytes]:
    blob = _blob()
    pixels = np.where(blob[..., None], 230, 25).astype(np.uint8).repeat(3, axis=2)
    image = _encode(pixels, fmt, quality=95) if fmt == "JPEG" else _encode(pixels, fmt)
    return image, _encode((blob * 255).astype(np.uint8), "PNG")  # the mask: the image, thresholded


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood holds both values: the only place interpolation may disagree with nearest."""
    padded = np.pad(mask, 1, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3))
    return windows.min(axis=(2, 3)) != windows.max(axis=(2, 3))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])  # JPEG: the reduced-scale (draft) decode path
@pytest.mark.parametrize("train", [True, False])
def test_crop_and_flip_keep_image_and_mask_aligned(fmt, train):
    image, mask = _image_and_mask(fmt)
    flips = 0
    for k in range(12):
        out = transform_row(
            {"image": image, "mask": mask}, KINDS, f"sample-{k}", SIZE, train, seed=1, epoch=0, crop_scale=(0.2, 1.0)
        )
        assert out["image"].shape == (3, SIZE, SIZE) and out["image"].dtype == np.float32
        assert out["mask"].shape == (1, SIZE, SIZE) and out["mask"].dtype == np.uint8
        thresholded = out["image"].mean(axis=0) > 0.5
        transformed = out["mask"][0] > 0
        interior = ~_boundary(transformed)
        assert transformed.any() and interior.sum() > SIZE * SIZE // 2
        assert np.array_equal(thresholded[interior], transformed[interior]), f"sample-{k}: image and mask differ"
        # The check has teeth: the mask flipped the other way disagrees well inside the shapes.
        mirrored = transformed[:, ::-1]
        flips += int(not np.array_equal(thresholded[interior], mirrored[interior]))
    assert flips == 12  # the foreground is asymmetric, so a wrong flip is always seen
    if train:  # the train transform flips about half the samples: a whole-image crop of a square is the eval view
        square = _encode(np.where(_blob(300, 300)[..., None], 230, 25).astype(np.uint8).repeat(3, axis=2), "PNG")
        plain = transform_row({"image": square}, KINDS, "x", SIZE, False)["image"]
        views = [
            transform_row({"image": square}, KINDS, f"sample-{k}", SIZE, True, seed=1, crop_scale=(1.0, 1.0))["image"]
            for k in range(12)
        ]
        flipped = sum(np.array_equal(v, plain[:, :, ::-1]) for v in views)
        assert 0 < flipped < 12 and flipped + sum(np.array_equal(v, plain) for v in views) == 12


def test_masks_keep_their_values_exactly():
    rng = np.random.default_rng(0)
    concept = np.zeros((90, 120), dtype=np.uint8)
    concept[10:50, 20:70] = 3
    concept[40:80, 60:110] = 7
    concept[0:20, 100:120] = 200
    binary = (rng.random((90, 120)) < 0.3).astype(np.uint8)  # a 0/1 mask
    image = _encode(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8), "PNG")
    for values in (concept, binary):
        mask = inspect_mask(_encode(values, "PNG")).data
        for k in range(6):
            out = transform_row({"image": image, "mask": mask}, KINDS, f"s{k}", 24, True, crop_scale=(0.1, 1.0))
            assert set(np.unique(out["mask"]).tolist()) <= set(np.unique(values).tolist())
        full = transform_row({"image": image, "mask": mask}, KINDS, "s", 24, False)["mask"]
        assert set(np.unique(full).tolist()) == set(np.unique(values).tolist())


def test_stored_masks_round_trip_and_odd_modes_are_read_or_refused():
    values = np.array([[0, 1, 2], [255, 7, 0]], dtype=np.uint8)
    assert np.array_equal(mask_values(inspect_mask(_encode(values, "PNG")).data), values)
    palette = Image.fromarray(values).convert("P")  # P: the indices are the values
    palette.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    assert np.array_equal(mask_values(buffer.getvalue()), np.asarray(palette))
    bilevel = Image.fromarray(values > 0).convert("1")
    buffer = io.BytesIO()
    bilevel.save(buffer, format="PNG")
    assert set(np.unique(mask_values(buffer.getvalue())).tolist()) == {0, 255}
    with pytest.raises(ImageDecodeError, match="single-channel") as info:
        mask_values(_encode(np.zeros((4, 4, 3), dtype=np.uint8), "PNG"), "rgb.png")
    assert info.value.reason == SkipReason.MASK_INVALID
    with pytest.raises(ImageDecodeError, match=r"values in \[0, 1000\]"):
        mask_values(_encode(np.array([[0, 1000]], dtype=np.uint16), "PNG"), "deep.png")
    with pytest.raises(ImageDecodeError) as info:
        mask_values(b"not a png", "junk.png")
    assert info.value.reason == SkipReason.MASK_INVALID


def test_an_undecodable_mask_names_the_sample_and_column():
    image, _ = _image_and_mask("PNG")
    with pytest.raises(ImageDecodeError, match="sample s7 column 'mask'"):
        transform_row({"image": image, "mask": b"junk"}, KINDS, "s7", SIZE, True)


def test_other_image_columns_get_the_same_crop_and_flip():
    image, _ = _image_and_mask("PNG")
    small = _encode(np.asarray(Image.open(io.BytesIO(image)).resize((200, 150), Image.Resampling.BICUBIC)), "PNG")
    kinds = {"image": "image", "left": "image", "right": "image"}
    for k in range(6):
        out = transform_row({"image": image, "left": image, "right": small}, kinds, f"t{k}", SIZE, True)
        assert np.array_equal(out["left"], out["image"])
        # Half the resolution: the same part of the picture (the box is scaled), up to resampling differences.
        assert np.abs(out["right"] - out["image"]).mean() < 0.03


def _exif_rotated_jpeg() -> bytes:
    upright = np.where(_blob(200, 120)[..., None], 200, 40).astype(np.uint8).repeat(3, axis=2)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(buffer, format="JPEG", exif=exif, quality=95)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["jpeg_large", "png", "exif_rotated"])
def test_eval_preprocessing_is_one_implementation(kind):
    """Training-side validation (``transform_image``/``transform_row`` with ``train=False``, what
    ``ShardBatchSource(train=False)`` runs) and the evaluation suites (``decode_batch``) give identical pixels."""
    if kind == "jpeg_large":  # >= 2x the output: the reduced-scale decode, where two implementations used to differ
        data = _image_and_mask("JPEG")[0]
    elif kind == "png":
        data = _image_and_mask("PNG")[0]
    else:
        data = _exif_rotated_jpeg()
    for size in (16, 48):
        suites, reasons = decode_batch([data], ["x"], size)
        assert reasons == [None]
        validation = transform_image(data, "x", size, train=False, seed=5, epoch=3)
        assert np.array_equal(suites[0], validation)
        assert np.array_equal(suites[0], eval_image(data, size))
        assert np.array_equal(suites[0], transform_row({"image": data}, KINDS, "y", size, train=False)["image"])
    if kind == "png":  # the PIL-image entry point is the same transform too
        assert np.array_equal(eval_transform(Image.open(io.BytesIO(data)), 48), eval_image(data, 48))


def test_eval_is_resize_shorter_side_then_center_crop():
    pixels = np.zeros((60, 100, 3), dtype=np.uint8)
    pixels[:, 20:80] = 255  # the centred 60x60 square is white; what lies outside it is black
    pixels[25:35, 45:55] = 0  # a dark dot in the very centre
    out = eval_image(_encode(pixels, "PNG"), 30)
    assert out.shape == (3, 30, 30)
    assert out[:, :, 2:-2][:, :10].min() > 0.99  # the black sides are cut away
    assert out[:, 14:16, 14:16].max() < 0.05  # the dot stays in the centre at half the size
