"""prepare_data end to end on Ray with per-concept ImageNet-S masks (``source.mask_format: imagenet_s``)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from robustfm.data.config import PrepareConfig, SourceConfig
from robustfm.data.masks import mask_values
from robustfm.data.prepare import run
from robustfm.data.shards import Location, load_manifest
from robustfm.testing.datasets import make_image_folder
from tests.unit.test_concept_masks import save_imagenet_s

pytestmark = pytest.mark.ray


@pytest.mark.timeout(120)
def test_prepare_merges_imagenet_s_concept_masks_and_the_format_decides_the_shards(ray_session, tmp_path):
    masks = tmp_path / "masks"
    tree = make_image_folder(tmp_path / "src", n_classes=2, per_class=3, size=24, splits=("train",))
    expected = {}
    for k, rel in enumerate(sorted(p.relative_to(tree.root).as_posix() for p in tree.root.rglob("*.jpg"))):
        _, cls, name = rel.split("/")
        stem = name.removesuffix(".jpg")
        beak, wing = np.zeros((24, 24), np.int64), np.full((24, 24), 1000)
        beak[: 2 + k, :5] = 130 + 256 * 2  # label 642
        wing[10:, 10 + k :] = 9
        save_imagenet_s(beak, masks / cls / f"{stem}__beak.png")
        save_imagenet_s(wing, masks / cls / f"{stem}__wing.png")
        expected[rel] = np.where((beak > 0) | (wing == 9), 255, 0)
    gone = f"train/{tree.classes[1]}/img_0002.jpg"
    for file in (masks / tree.classes[1]).glob("img_0002__*.png"):
        file.unlink()

    def config(mask_format: str) -> PrepareConfig:
        source = SourceConfig(kind="image_folder", root=str(tree.root), masks=str(masks), mask_format=mask_format)
        return PrepareConfig(source=source, output=str(tmp_path / "out"), shard_size=10, progress=False)

    as_binary = run(config("binary"))  # RGB label files are not single-channel masks: refused, never guessed
    assert as_binary.skipped_by_reason == {"mask_invalid": 5, "mask_missing": 1}
    summary = run(config("imagenet_s"))  # another format makes other shards: nothing of the first run is reused
    assert summary.shards_reused == 0 and summary.counts == {"train": 5}
    assert summary.skipped_by_reason == {"mask_missing": 1} and summary.skipped[0]["path"] == gone
    manifest = load_manifest(Location(str(tmp_path / "out")))
    assert manifest["source"]["mask_format"] == "imagenet_s" and manifest["columns"]["mask"]["kind"] == "mask"
    (shard,) = manifest["splits"]["train"]["shards"]
    rows = pq.read_table(tmp_path / "out" / shard["file"], columns=["id", "mask"]).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(set(expected) - {gone})
    for row in rows:
        np.testing.assert_array_equal(mask_values(row["mask"]), expected[row["id"]])
