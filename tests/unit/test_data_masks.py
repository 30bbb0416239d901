"""The converter's masks and extra columns, shard by shard (no Ray): what is stored, and what is skipped and why."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from robustfm.data.config import PrepareConfig, SourceConfig
from robustfm.data.masks import mask_values
from robustfm.data.prepare import build_manifest, convert_shard, plan_shards
from robustfm.data.row_columns import MaskTree, mask_candidates
from robustfm.data.shards import ColumnKind, ColumnSpec, Location, manifest_columns
from robustfm.data.sources import SourceItem, SourceListing, list_image_folder
from robustfm.testing.datasets import generated_image, make_image_folder, save_image, save_mask

MASK = {"mask": ColumnSpec(ColumnKind.MASK, "foreground")}


def _rows(data: bytes | None) -> list[dict]:
    return [] if data is None else pq.read_table(io.BytesIO(data)).to_pylist()


def test_mask_candidates_mirror_the_image_path_with_or_without_the_split_folder():
    assert mask_candidates("train/cat/a.jpg", "train") == ["train/cat/a.png", "cat/a.png"]
    assert mask_candidates("cat/a.jpg", "train") == ["cat/a.png"]
    assert mask_candidates("train2017/0001.jpg", "train") == ["train2017/0001.png"]


@pytest.mark.parametrize("with_splits", [True, False])
def test_masks_are_attached_exactly_and_every_problem_is_skipped_with_its_reason(tmp_path, with_splits):
    masks = tmp_path / "masks"
    tree = make_image_folder(
        tmp_path / "images", n_classes=2, per_class=3, size=24, splits=("train",), masks=masks,
        masks_with_splits=with_splits,
    )  # fmt: skip
    inside = "train/" if with_splits else ""
    cls = tree.classes[0]
    (masks / f"{inside}{cls}/img_0000.png").unlink()  # missing
    save_mask(np.zeros((10, 24), dtype=np.uint8), masks / f"{inside}{cls}/img_0001.png")  # other size
    (masks / f"{inside}{cls}/img_0002.png").write_bytes(b"not a png")  # undecodable
    concept = np.arange(24 * 24, dtype=np.uint32).reshape(24, 24) % 5  # values 0..4 kept as they are
    other = tree.classes[1]
    save_mask(concept.astype(np.uint8), masks / f"{inside}{other}/img_0000.png")
    tree.masks[f"train/{other}/img_0000.jpg"] = concept.astype(np.uint8)

    listing = list_image_folder(Location(str(tree.root)))
    (plan,) = plan_shards(listing, shard_size=10)
    data, record = convert_shard(
        pafs.LocalFileSystem(), str(tree.root), plan, MASK, MaskTree(pafs.LocalFileSystem(), str(masks))
    )
    skipped = {s["path"]: (s["reason"], s["detail"]) for s in record["skipped"]}
    assert {p: r for p, (r, _) in skipped.items()} == {
        f"train/{cls}/img_0000.jpg": "mask_missing",
        f"train/{cls}/img_0001.jpg": "mask_size_mismatch",
        f"train/{cls}/img_0002.jpg": "mask_invalid",
    }
    assert f"{cls}/img_0000.png" in skipped[f"train/{cls}/img_0000.jpg"][1]  # the message names where it looked
    assert "24x10" in skipped[f"train/{cls}/img_0001.jpg"][1]
    rows = _rows(data)
    assert len(rows) == record["rows"] == 3 and all(r["class_name"] == other for r in rows)
    for row in rows:
        stored = Image.open(io.BytesIO(row["mask"]))
        assert stored.format == "PNG" and stored.mode == "L"
        np.testing.assert_array_equal(mask_values(row["mask"]), tree.masks[row["source_path"]])
    values = {r["source_path"]: set(np.unique(mask_values(r["mask"])).tolist()) for r in rows}
    assert values.pop(f"train/{other}/img_0000.jpg") == {0, 1, 2, 3, 4}
    assert all(v == {0, 255} for v in values.values()) and len(values) == 2  # generated shapes: exact 0/255


def test_masks_change_the_plan_fingerprint_so_old_shards_are_not_reused(tmp_path):
    tree = make_image_folder(tmp_path / "images", n_classes=1, per_class=2, size=16)
    listing = list_image_folder(Location(str(tree.root)))
    (plain,) = plan_shards(listing, 10)
    (masked,) = plan_shards(listing, 10, variant='{"masks": "x"}')
    assert plain.fingerprint != masked.fingerprint and plain.items == masked.items
    (again,) = plan_shards(listing, 10)
    assert again.fingerprint == plain.fingerprint


def test_a_source_can_list_extra_columns_of_every_kind(tmp_path):
    """A 2AFC-style listing: reference image, two distortions, a judgement and a pair key, plus a listed mask."""
    root = tmp_path / "twoafc"
    for i in range(3):
        for part, seed in (("ref", i), ("p0", 10 + i), ("p1", 20 + i)):
            save_image(generated_image(i % 2, 20, seed), root / part / f"{i}.png")
        save_mask((generated_image(0, 20, i)[..., 0] > 128).astype(np.uint8), root / "mask" / f"{i}.png")
    (root / "p1" / "2.png").write_bytes(b"")  # an empty distortion: the triplet is skipped, naming the column
    columns = {
        "left": ColumnSpec(ColumnKind.IMAGE, "distortion 0"),
        "right": ColumnSpec(ColumnKind.IMAGE, "distortion 1"),
        "judge": ColumnSpec(ColumnKind.FLOAT, "share preferring right"),
        "triplet": ColumnSpec(ColumnKind.GROUP, "triplet id"),
        "region": ColumnSpec(ColumnKind.MASK, "listed mask"),
    }
    items = [
        SourceItem(
            f"ref/{i}.png", f"ref/{i}.png", 0, "pair",
            extra=(("left", f"p0/{i}.png"), ("right", f"p1/{i}.png"), ("judge", i / 3), ("triplet", f"t{i}"),
                   ("region", f"mask/{i}.png")),
        )
        for i in range(3)
    ]  # fmt: skip
    listing = SourceListing("twoafc", str(root), ("pair",), ("pair",), {"val": items}, columns=columns)
    (plan,) = plan_shards(listing, 10, mix_seed=None)
    data, record = convert_shard(pafs.LocalFileSystem(), str(root), plan, columns)
    rows = _rows(data)
    assert [r["triplet"] for r in rows] == ["t0", "t1"] and [r["judge"] for r in rows] == [0.0, 1 / 3]
    original = np.asarray(Image.open(root / "p1" / "1.png").convert("RGB"))
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(rows[1]["right"])).convert("RGB")), original)
    assert set(np.unique(mask_values(rows[0]["region"])).tolist()) <= {0, 1}
    ((skip),) = record["skipped"]
    assert skip["path"] == "ref/2.png" and skip["reason"] == "empty_file" and "column 'right'" in skip["detail"]

    config = PrepareConfig(source=SourceConfig(kind="image_folder", root=str(root)), output=str(tmp_path / "out"))
    manifest = build_manifest(config, listing, [plan], {("val", 0): {**record, "sha256": "", "bytes": 0}}, columns)
    declared = manifest_columns(manifest)
    assert manifest["schema_version"] == 2 and declared["judge"] == columns["judge"]
    assert list(declared)[-5:] == list(columns)

    broken = SourceListing(
        "twoafc", str(root), ("pair",), ("pair",), {"val": [items[0]]}, columns={"extra": columns["judge"]}
    )
    with pytest.raises(ValueError, match="no value for its listing's column 'extra'"):
        convert_shard(pafs.LocalFileSystem(), str(root), plan_shards(broken, 10)[0], broken.columns)


def test_mask_option_is_checked_in_the_config():
    from robustfm.config.core import ConfigError

    with pytest.raises(ConfigError, match="masks"):
        SourceConfig(root="/data/images", masks="/data/images/")
    assert SourceConfig(root="/data/images", masks="/data/masks").masks == "/data/masks"
