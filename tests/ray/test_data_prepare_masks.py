"""Schema v2 end to end on Ray: prepare_data attaches masks, readers decode them with the image's transform, the demo
set with masks, and schema-v1 shard sets (written as before masks existed) still read everywhere."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from robustfm.data.batch_source import ShardBatchSource
from robustfm.data.config import PrepareConfig, SourceConfig
from robustfm.data.masks import mask_values
from robustfm.data.prepare import run
from robustfm.data.reading import decode_images, open_shards
from robustfm.data.shards import (
    BASE_COLUMNS,
    Location,
    MissingColumnError,
    encode_shard,
    load_manifest,
    require_columns,
    sha256,
    shard_columns,
)
from robustfm.data.transforms import transform_row
from robustfm.testing.datasets import make_image_folder, save_mask

pytestmark = pytest.mark.ray


@pytest.mark.timeout(300)
def test_prepare_attaches_masks_and_readers_transform_them_with_the_image(ray_session, tmp_path):
    masks = tmp_path / "masks"
    tree = make_image_folder(tmp_path / "src", n_classes=2, per_class=4, size=40, splits=("train", "val"), masks=masks)
    cls = tree.classes[0]
    (masks / "train" / cls / "img_0001.png").unlink()
    save_mask(np.full((20, 40), 255, dtype=np.uint8), masks / "train" / cls / "img_0002.png")
    source = SourceConfig(kind="image_folder", root=str(tree.root), masks=str(masks), mask_meaning="shape pixels")
    config = PrepareConfig(source=source, output=str(tmp_path / "out"), shard_size=3, progress=False)
    summary = run(config)

    manifest = load_manifest(Location(config.output))
    assert manifest["schema_version"] == 2 and manifest["source"]["masks"] == str(masks)
    assert manifest["columns"]["mask"] == {"kind": "mask", "meaning": "shape pixels"}
    assert shard_columns(config.output)["mask"].meaning == "shape pixels"
    assert {s["path"]: s["reason"] for s in manifest["skipped"]} == {
        f"train/{cls}/img_0001.jpg": "mask_missing",
        f"train/{cls}/img_0002.jpg": "mask_size_mismatch",
    }
    assert summary.counts == {"train": 6, "val": 8}
    assert run(config).shards_written == 0  # resumable like any conversion

    stored = {r["id"]: r for r in open_shards(config.output, "train", columns=["id", "image", "mask"]).take_all()}
    for sample_id, row in stored.items():
        np.testing.assert_array_equal(mask_values(row["mask"]), tree.masks[sample_id])
    source_batches = ShardBatchSource(config.output, "train", 32, 3, train=True, seed=2, crop_scale=(0.3, 1.0))
    batches = list(source_batches.batches(0, 0, 1))
    assert len(batches) == 2
    for batch in batches:
        assert batch["mask"].shape == (3, 1, 32, 32) and str(batch["mask"].dtype) == "torch.uint8"
        for k, sample_id in enumerate(batch["id"]):  # the mask got the image's crop and flip
            row = stored[sample_id]
            expected = transform_row(
                {"image": row["image"], "mask": row["mask"]}, {"image": "image", "mask": "mask"}, sample_id, 32,
                True, seed=2, epoch=0, crop_scale=(0.3, 1.0),
            )  # fmt: skip
            np.testing.assert_array_equal(batch["mask"][k].numpy(), expected["mask"])
            np.testing.assert_array_equal(batch["image"][k].numpy(), expected["image"])
    plain = next(ShardBatchSource(config.output, "val", 32, 4, train=False, columns=["label"]).batches(0, 0, 1))
    assert "mask" not in plain and plain["image"].shape == (4, 3, 32, 32)
    with pytest.raises(MissingColumnError, match=r"\['depth'\]"):
        ShardBatchSource(config.output, "val", 32, 4, train=False, columns=["depth"]).dataset(0, 0, 1)


def _write_v1_shard_set(root, tree) -> str:
    """A shard set exactly as schema version 1 wrote it: no declarations, version 1 in the files and manifest."""
    from PIL import Image

    rows = []
    for rel in sorted(p.relative_to(tree.root).as_posix() for p in tree.root.rglob("*.jpg")):
        image = Image.open(tree.root / rel)
        rows.append(
            {
                "id": rel, "image": (tree.root / rel).read_bytes(), "label": tree.classes.index(rel.split("/")[0]),
                "class_name": rel.split("/")[0], "captions": [], "source_path": rel, "width": image.width,
                "height": image.height,
            }
        )  # fmt: skip
    table = pq.read_table(io.BytesIO(encode_shard(rows)))
    table = table.replace_schema_metadata({"robustfm.schema_version": "1"})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    (root / "train").mkdir(parents=True)
    (root / "train" / "shard-00000.parquet").write_bytes(buffer.getvalue())
    shard = {"file": "train/shard-00000.parquet", "rows": len(rows), "sha256": sha256(buffer.getvalue()),
             "bytes": len(buffer.getvalue())}  # fmt: skip
    manifest = {
        "format": "robustfm-shards", "schema_version": 1, "columns": list(BASE_COLUMNS),
        "source": {"kind": "image_folder", "root": str(tree.root), "splits": ["train"]},
        "classes": list(tree.classes), "class_ids": list(tree.classes), "shard_size": 100,
        "splits": {"train": {"count": len(rows), "counts_per_class": tree.counts["train"], "shards": [shard]}},
        "skipped": [], "skipped_by_reason": {},
    }  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


@pytest.mark.timeout(300)
def test_schema_v1_shard_sets_still_read_everywhere(ray_session, tmp_path):
    tree = make_image_folder(tmp_path / "src", n_classes=2, per_class=4, size=24)
    path = _write_v1_shard_set(tmp_path / "v1", tree)
    assert load_manifest(Location(path))["schema_version"] == 1
    assert list(shard_columns(path)) == list(BASE_COLUMNS)
    rows = decode_images(open_shards(path, "train"), 16, train=False, seed=0, epoch=0).take_all()
    assert len(rows) == 8 and rows[0]["image"].shape == (3, 16, 16)
    batches = list(ShardBatchSource(path, "train", 16, 4, train=True, seed=0).batches(0, 0, 1))
    assert len(batches) == 2 and "mask" not in batches[0] and batches[0]["image"].shape == (4, 3, 16, 16)
    with pytest.raises(MissingColumnError, match=rf"reads column\(s\) \['mask'\].*{tmp_path / 'v1'}"):
        require_columns(path, ["image", "mask"], reader="suite 'masked'")
    with pytest.raises(MissingColumnError, match="mask"):
        open_shards(path, "train", columns=["id", "mask"])


@pytest.mark.timeout(300)
def test_demo_set_with_masks_goes_through_the_mask_path(ray_session, tmp_path):
    from robustfm.data.demo import DEMO_MASK_MEANING, write_demo_shards

    shards = write_demo_shards(tmp_path, image_size=32, n_images=6, n_val=3, shard_size=4, with_masks=True)
    manifest = load_manifest(Location(str(shards)))
    assert manifest["columns"]["mask"]["meaning"] == DEMO_MASK_MEANING and manifest["skipped"] == []
    assert manifest["source"]["masks"] == str(tmp_path.resolve() / "masks")
    rows = open_shards(str(shards), "train", columns=["id", "class_name", "mask"]).take_all()
    assert len(rows) == 6 and "horse" in {r["class_name"] for r in rows}
    for row in rows:
        values = mask_values(row["mask"])
        written = mask_values((tmp_path / "masks" / row["id"]).with_suffix(".png").read_bytes())
        np.testing.assert_array_equal(values, written)
        assert set(np.unique(values).tolist()) == {0, 255} and 0.05 < (values > 0).mean() < 0.95
    assert not (tmp_path / "shards").exists()  # the plain demo is not touched
