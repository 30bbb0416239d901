"""Robust decoding: every awkward file either becomes the right upright RGB image or is skipped with its reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from robustfm.data.images import ImageDecodeError, SkipReason, decode_crop_resize, inspect_image, load_rgb
from robustfm.data.reading import center_box
from robustfm.testing.datasets import BAD_FILE_KINDS, BAD_FILE_SKIP_REASON, generated_image, write_bad_files

# JPEG re-encodes (CMYK, grayscale, EXIF-rotated files are JPEGs) differ from the source pixels by a few levels.
LOSSY_TOLERANCE = 8.0


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return write_bad_files(tmp_path_factory.mktemp("bad"), size=40, seed=3, class_index=1)


@pytest.mark.parametrize("kind", BAD_FILE_KINDS)
def test_every_bad_file_kind_decodes_correctly_or_is_skipped_with_its_reason(bad_files, kind):
    path, expected = bad_files[kind]
    data = path.read_bytes()
    reason = BAD_FILE_SKIP_REASON[kind]
    if reason is not None:
        with pytest.raises(ImageDecodeError) as info:
            inspect_image(data, path.name)
        assert info.value.reason == reason
        assert path.name in str(info.value)
        return
    image = load_rgb(data, path.name)
    assert image.mode == "RGB"
    pixels = np.asarray(image).astype(np.float64)
    assert pixels.shape == expected.shape
    assert np.abs(pixels - expected).mean() < LOSSY_TOLERANCE
    # What a shard stores must decode to the same upright RGB with a plain PIL open + convert (no special cases).
    stored = inspect_image(data, path.name)
    plain = np.asarray(Image.open(io.BytesIO(stored.data)).convert("RGB")).astype(np.float64)
    assert (stored.width, stored.height) == (expected.shape[1], expected.shape[0])
    assert np.abs(plain - pixels).max() <= 1.0
    assert stored.reencoded


def test_sixteen_bit_is_rescaled_not_clipped(bad_files):
    path, expected = bad_files["sixteen_bit"]
    pixels = np.asarray(load_rgb(path.read_bytes()))
    assert (pixels == 255).mean() < 0.5  # PIL's plain convert clips 16-bit values: almost every pixel turns white
    np.testing.assert_array_equal(pixels, expected)


def test_exif_rotation_swaps_width_and_height(bad_files):
    path, expected = bad_files["exif_rotated"]
    raw = Image.open(path)
    assert raw.size == (expected.shape[0], expected.shape[1])  # stored turned by 90 degrees
    assert load_rgb(path.read_bytes()).size == (expected.shape[1], expected.shape[0])


def test_plain_rgb_jpeg_is_kept_byte_for_byte():
    buffer = io.BytesIO()
    Image.fromarray(generated_image(0, 32, seed=1)).save(buffer, format="JPEG")
    stored = inspect_image(buffer.getvalue())
    assert stored.data == buffer.getvalue() and not stored.reencoded
    assert (stored.width, stored.height) == (32, 32)


def test_transparent_pixels_are_composited_on_white():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:4, :, :] = (255, 0, 0, 255)  # top half opaque red, bottom half fully transparent black
    buffer = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buffer, format="PNG")
    pixels = np.asarray(load_rgb(buffer.getvalue()))
    assert tuple(pixels[0, 0]) == (255, 0, 0)
    assert tuple(pixels[-1, -1]) == (255, 255, 255)


def test_garbage_after_a_valid_header_is_a_decode_error_not_a_crash():
    buffer = io.BytesIO()
    Image.fromarray(generated_image(0, 32, seed=1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[60:200] = bytes(140)  # zero the compressed pixel stream
    with pytest.raises(ImageDecodeError) as info:
        inspect_image(bytes(data), "broken.png")
    assert info.value.reason in (SkipReason.DECODE_ERROR, SkipReason.TRUNCATED)


def test_reduced_scale_jpeg_decode_matches_full_decode():
    # A large photo-like JPEG: the draft (DCT-scaled) decode path must give nearly the same output.
    pixels = np.asarray(Image.fromarray(generated_image(2, 400, seed=5)).resize((400, 300)))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    fast = decode_crop_resize(buffer.getvalue(), center_box, 32).astype(np.float64)
    full = np.asarray(load_rgb(buffer.getvalue()).resize((32, 32), Image.Resampling.BICUBIC, box=center_box(400, 300)))
    assert fast.shape == (32, 32, 3)
    assert np.abs(fast - full).mean() < 4.0
