"""Concept masks on the mask column (no Ray): the imagenet_s format, per-concept files merged by max, and every bad
file skipped with the file named."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from robustfm.data.concept_masks import (
    MaskTreeReader,
    decode_mask,
    imagenet_s_labels,
    merge_concept_masks,
    split_concept_file,
)
from robustfm.data.images import ImageDecodeError
from robustfm.data.masks import mask_values
from robustfm.data.prepare import convert_shard, plan_shards
from robustfm.data.row_columns import MaskTree, RowSkipped
from robustfm.data.shards import ColumnKind, ColumnSpec, Location
from robustfm.data.sources import SourceItem, list_image_folder
from robustfm.testing.datasets import make_image_folder, save_mask

MASK = {"mask": ColumnSpec(ColumnKind.MASK, "concepts")}


def save_imagenet_s(labels: np.ndarray, path: Path) -> None:
    """Write labels as ImageNet-S does: an RGB PNG with R = label % 256, G = label // 256, B = 0."""
    rgb = np.stack([labels % 256, labels // 256, np.zeros_like(labels)], axis=-1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, format="PNG")


def _png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def test_imagenet_s_labels_are_r_plus_256_g_and_0_and_1000_are_background(tmp_path):
    labels = np.array([[0, 1, 255, 256], [257, 999, 1000, 0], [512, 1000, 7, 3]], dtype=np.int64)
    save_imagenet_s(labels, tmp_path / "m.png")
    data = _png_bytes(tmp_path / "m.png")
    np.testing.assert_array_equal(imagenet_s_labels(data, "m.png"), labels)
    expected = np.array([[0, 255, 255, 255], [255, 255, 0, 0], [255, 0, 255, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(decode_mask(data, "m.png", "imagenet_s"), expected)
    assert decode_mask(data, "m.png", "imagenet_s").dtype == np.uint8
    with pytest.raises(ImageDecodeError, match="mode RGB is not a single-channel mask"):
        decode_mask(data, "m.png", "binary")  # the format is explicit, never guessed


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p: save_mask(np.full((4, 4), 3, np.uint8), p), "mode L is not an imagenet_s mask"),
        (lambda p: save_imagenet_s(np.full((4, 4), 1001), p), "label 1001 is above 1000"),
        (
            lambda p: Image.fromarray(np.full((4, 4, 3), 9, np.uint8)).save(p, format="PNG"),
            "blue channel is not zero",
        ),
        (lambda p: p.write_bytes(b"not a png"), "not_an_image"),
    ],
)
def test_files_not_in_the_imagenet_s_format_are_refused_naming_them(tmp_path, write, message):
    path = tmp_path / "bad.png"
    write(path)
    with pytest.raises(ImageDecodeError, match=message) as err:
        decode_mask(path.read_bytes(), str(path), "imagenet_s")
    assert err.value.reason == "mask_invalid" and str(path) in err.value.detail


def test_concept_file_names_split_at_the_last_double_underscore():
    assert split_concept_file("img_0001__long beak.png") == ("img_0001", "long beak")
    assert split_concept_file("a__b__wing.png") == ("a__b", "wing")
    for name in ("img_0001.png", "__wing.png", "img__.png", "img__wing.jpg"):
        assert split_concept_file(name) is None


def test_merge_is_the_maximum_of_the_concept_masks():
    a = np.array([[0, 255], [0, 0]], np.uint8)
    b = np.array([[0, 0], [255, 0]], np.uint8)
    c = np.array([[1, 0], [0, 0]], np.uint8)
    np.testing.assert_array_equal(merge_concept_masks([a, b, c]), [[1, 255], [255, 0]])
    with pytest.raises(ValueError, match=r"wing.png has shape \(3, 2\), head.png has \(2, 2\)"):
        merge_concept_masks([a, np.zeros((3, 2), np.uint8)], ["head.png", "wing.png"])


def _item(path: str) -> SourceItem:
    return SourceItem(path, path, 0, "bird")


@pytest.mark.parametrize("mask_format", ["binary", "imagenet_s"])
def test_per_concept_files_beside_or_instead_of_the_image_mask_are_merged_by_max(tmp_path, mask_format):
    root = tmp_path / "masks"
    head, wing, whole = (np.zeros((6, 8), np.int64) for _ in range(3))
    head[0:2, 0:3] = 12
    wing[3:5, 2:6] = 300  # a label above 255: fits imagenet_s only
    whole[5, :] = 1000  # ImageNet-S "other": background
    whole[0, 7] = 5

    def write(values: np.ndarray, path: Path) -> None:
        if mask_format == "imagenet_s":
            save_imagenet_s(values, path)
        else:
            save_mask(np.where(values == 1000, 0, np.minimum(values, 255)).astype(np.uint8), path)

    write(head, root / "bird/a__head.png")
    write(wing, root / "bird/a__wing.png")
    write(whole, root / "bird/a.png")
    write(wing, root / "bird/b__wing.png")  # concepts only, no b.png
    write(head, root / "bird/a__b__head.png")  # concept "head" of image "a__b", not of "a"
    reader = MaskTreeReader(MaskTree(pafs.LocalFileSystem(), str(root)), mask_format)

    found, _ = reader.files("train/bird/a.jpg", "train")
    assert found == ["bird/a.png", "bird/a__head.png", "bird/a__wing.png"]
    merged = mask_values(reader.mask(_item("train/bird/a.jpg"), "train", 8, 6))
    fg = (head > 0) | (wing > 0) | ((whole > 0) & (whole != 1000))
    if mask_format == "imagenet_s":
        np.testing.assert_array_equal(merged, np.where(fg, 255, 0))
    else:  # values kept exactly, merged by max
        np.testing.assert_array_equal(merged, np.maximum.reduce([np.minimum(m, 255) * (m != 1000) for m in
                                                                   (head, wing, whole)]))  # fmt: skip
    only = mask_values(reader.mask(_item("train/bird/b.jpg"), "train", 8, 6))
    np.testing.assert_array_equal(only > 0, wing > 0)
    assert reader.files("train/bird/a__b.jpg", "train")[0] == ["bird/a__b__head.png"]


def test_a_missing_invalid_or_mis_sized_concept_file_skips_its_image_naming_the_file(tmp_path):
    root = tmp_path / "masks"
    save_mask(np.full((6, 8), 255, np.uint8), root / "bird/a__head.png")
    save_mask(np.zeros((5, 8), np.uint8), root / "bird/a__wing.png")  # other size
    (root / "bird/c__head.png").write_bytes(b"garbage")
    reader = MaskTreeReader(MaskTree(pafs.LocalFileSystem(), str(root)), "binary")
    with pytest.raises(RowSkipped) as missing:
        reader.mask(_item("train/bird/b.jpg"), "train", 8, 6)
    assert missing.value.reason == "mask_missing"
    assert "train/bird/b.png or bird/b.png" in missing.value.detail and "__<concept>.png" in missing.value.detail
    with pytest.raises(RowSkipped) as mis_sized:
        reader.mask(_item("train/bird/a.jpg"), "train", 8, 6)
    assert mis_sized.value.reason == "mask_size_mismatch" and "bird/a__wing.png is 8x5" in mis_sized.value.detail
    with pytest.raises(RowSkipped) as invalid:
        reader.mask(_item("train/bird/c.jpg"), "train", 8, 6)
    assert invalid.value.reason == "mask_invalid" and "bird/c__head.png" in invalid.value.detail
    with pytest.raises(ValueError, match="'rle' is not one of binary, imagenet_s"):
        MaskTreeReader(MaskTree(pafs.LocalFileSystem(), str(root)), "rle")


def test_a_shard_with_imagenet_s_concept_masks_stores_binary_masks_and_lists_skips(tmp_path):
    """convert_shard (what each Ray task runs) on an image folder whose masks are per-concept ImageNet-S files."""
    masks = tmp_path / "masks"
    tree = make_image_folder(tmp_path / "images", n_classes=2, per_class=3, size=16, splits=("train",))
    expected = {}
    for rel in sorted(p.relative_to(tree.root).as_posix() for p in tree.root.rglob("*.jpg")):
        _, cls, name = rel.split("/")
        stem = name.removesuffix(".jpg")
        part = np.zeros((16, 16), np.int64)
        part[: 4 + len(expected), :8] = 417  # a class label above 255
        other = np.full((16, 16), 1000)
        other[12:, 12:] = 3
        save_imagenet_s(part, masks / cls / f"{stem}__head.png")
        save_imagenet_s(other, masks / cls / f"{stem}__tail.png")
        expected[rel] = np.where((part > 0) | ((other > 0) & (other != 1000)), 255, 0)
    missing = f"train/{tree.classes[0]}/img_0001.jpg"
    for file in (masks / tree.classes[0]).glob("img_0001__*.png"):
        file.unlink()
    (plan,) = plan_shards(list_image_folder(Location(str(tree.root))), shard_size=10)
    data, record = convert_shard(
        pafs.LocalFileSystem(), str(tree.root), plan, MASK, MaskTree(pafs.LocalFileSystem(), str(masks)), "imagenet_s"
    )
    ((skip),) = record["skipped"]
    assert skip["path"] == missing and skip["reason"] == "mask_missing" and "img_0001.png" in skip["detail"]
    rows = pq.read_table(io.BytesIO(data)).to_pylist()
    assert len(rows) == 5
    for row in rows:
        assert Image.open(io.BytesIO(row["mask"])).mode == "L"
        np.testing.assert_array_equal(mask_values(row["mask"]), expected[row["source_path"]])


def test_mask_format_is_checked_in_the_config():
    from robustfm.config.core import ConfigError, load_config
    from robustfm.data.config import SourceConfig

    with pytest.raises(ConfigError, match="mask_format.*needs source.masks"):
        SourceConfig(root="/data/images", mask_format="imagenet_s")
    with pytest.raises(ConfigError, match="mask_format"):
        load_config(SourceConfig, overrides=["root=/data/images", "masks=/data/masks", "mask_format=rle"])
    assert SourceConfig(root="/data/images", masks="/data/m", mask_format="imagenet_s").mask_format == "imagenet_s"
    assert SourceConfig(root="/data/images").mask_format == "binary"
