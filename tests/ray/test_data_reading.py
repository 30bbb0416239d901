"""Reading shards with Ray Data: seeded crops and shuffles, equal disjoint rank shares, exact resume.

The data are the demo shards (real photos + generated shapes) written by ``write_demo_shards``, the same path user
data take.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustfm.data.batch_source import ShardBatchSource
from robustfm.data.reading import decode_images, open_shards, transform_image
from robustfm.data.shards import Location, load_manifest

pytestmark = pytest.mark.ray
BATCH = 4


@pytest.fixture(scope="module")
def demo_shards(ray_session, tmp_path_factory):
    from robustfm.testing.datasets import write_demo_shards

    return str(write_demo_shards(tmp_path_factory.mktemp("demo"), image_size=32, n_images=24, n_val=8, shard_size=8))


def _epoch(source, epoch, rank=0, world_size=1, skip=0):
    batches = list(source.batches(epoch, rank, world_size, skip))
    ids = [i for b in batches for i in b["id"]]
    pixels = torch.cat([b["image"] for b in batches]) if batches else torch.empty(0)
    return ids, pixels, batches


@pytest.mark.timeout(300)
def test_seeded_shuffle_and_crops_shares_and_resume(demo_shards):
    manifest = load_manifest(Location(demo_shards))
    assert manifest["splits"]["train"]["count"] == 24 and len(manifest["splits"]["train"]["shards"]) == 3
    source = ShardBatchSource(demo_shards, "train", 32, BATCH, train=True, seed=0, crop_scale=(0.3, 1.0))
    assert source.num_batches(0, 0, 2) == 3

    ids0, pix0, batches = _epoch(source, 0, 0, 2)
    ids1, pix1, _ = _epoch(source, 0, 1, 2)
    assert len(batches) == 3 and all(len(b["id"]) == BATCH for b in batches)
    assert batches[0]["image"].shape == (BATCH, 3, 32, 32) and batches[0]["image"].dtype == torch.float32
    assert batches[0]["label"].dtype == torch.int64 and batches[0]["epoch"].tolist() == [0] * BATCH
    assert all(isinstance(c, list) and c for c in batches[0]["captions"])
    # Equal, disjoint shares that cover the epoch (24 rows = 2 ranks x 3 batches x 4).
    assert len(ids0) == len(ids1) == 12 and not set(ids0) & set(ids1)
    assert set(ids0) | set(ids1) == {f"{s}" for s in _all_ids(demo_shards)}
    assert ids0 != sorted(ids0)  # shuffled

    # Same seed and epoch: the same pixels in the same order (a pickled copy, as a Ray Train worker gets it).
    import pickle

    again_ids, again_pix, _ = _epoch(pickle.loads(pickle.dumps(source)), 0, 0, 2)
    assert again_ids == ids0 and torch.equal(again_pix, pix0)

    # Resume after 2 consumed batches: exactly the last batch, same pixels.
    skipped_ids, skipped_pix, _ = _epoch(source, 0, 0, 2, skip=2)
    assert skipped_ids == ids0[8:] and torch.equal(skipped_pix, pix0[8:])

    # Another epoch or another seed: another order and other crops of the same images.
    epoch1_ids, epoch1_pix, _ = _epoch(source, 1, 0, 2)
    other = ShardBatchSource(demo_shards, "train", 32, BATCH, train=True, seed=1, crop_scale=(0.3, 1.0))
    seed1_ids, seed1_pix, _ = _epoch(other, 0, 0, 2)
    for ids, pix in ((epoch1_ids, epoch1_pix), (seed1_ids, seed1_pix)):
        assert len(ids) == 12 and ids != ids0
        common = [(k, ids.index(i)) for k, i in enumerate(ids0) if i in ids]
        assert common
        assert not any(torch.equal(pix0[k], pix[j]) for k, j in common)


def _all_ids(path):
    import pyarrow.parquet as pq

    manifest = load_manifest(Location(path))
    return [
        r
        for s in manifest["splits"]["train"]["shards"]
        for r in pq.read_table(f"{path}/{s['file']}", columns=["id"]).column("id").to_pylist()
    ]


@pytest.mark.timeout(300)
def test_eval_stream_keeps_manifest_order_and_matches_the_local_transform(demo_shards):
    source = ShardBatchSource(demo_shards, "val", 32, BATCH, train=False)
    ids, pixels, batches = _epoch(source, 0)
    rows = _val_rows(demo_shards)
    assert ids == rows["id"]
    for k in (0, len(ids) - 1):
        expected = transform_image(rows["image"][k], ids[k], 32, train=False, seed=0, epoch=0, crop_scale=(0.9, 1.0))
        np.testing.assert_array_equal(pixels[k].numpy(), expected)
    # The lower-level pieces compose the same way.
    decoded = decode_images(open_shards(demo_shards, "val"), 32, train=False, seed=0, epoch=0).take(2)
    np.testing.assert_array_equal(decoded[1]["image"], pixels[1].numpy())


def _val_rows(path):
    import pyarrow.parquet as pq

    manifest = load_manifest(Location(path))
    tables = [
        pq.read_table(f"{path}/{s['file']}", columns=["id", "image"]) for s in manifest["splits"]["val"]["shards"]
    ]
    return {
        "id": [i for t in tables for i in t.column("id").to_pylist()],
        "image": [i for t in tables for i in t.column("image").to_pylist()],
    }


@pytest.mark.timeout(300)
def test_holdout_rows_are_excluded_from_training_and_iterated_alone(demo_shards):
    ids_in_order = _all_ids(demo_shards)
    held_out = {i for k, i in enumerate(ids_in_order) if k % 4 == 0}
    common = dict(image_size=32, batch_size=BATCH, train=True, seed=0, holdout_fraction=0.25)
    training = ShardBatchSource(demo_shards, "train", holdout_role="exclude", **common)
    validation = ShardBatchSource(demo_shards, "train", holdout_role="only", **common)
    assert (training.num_rows, validation.num_rows) == (18, 6)
    train_ids, _, _ = _epoch(training, 0)
    val_ids, _, _ = _epoch(validation, 0)
    assert len(train_ids) == 16 and not set(train_ids) & held_out
    assert len(val_ids) == 4 and set(val_ids) <= held_out


@pytest.mark.timeout(300)
def test_a_row_subset_is_all_that_is_read_and_the_holdout_rule_applies_on_top(demo_shards):
    ids_in_order = _all_ids(demo_shards)
    chosen = [1, 2, 4, 5, 7, 8, 9, 12, 13, 20]
    common = dict(image_size=32, batch_size=2, train=True, seed=0, rows=chosen)
    subset = ShardBatchSource(demo_shards, "train", **common)
    assert subset.num_rows == 10
    ids, _, _ = _epoch(subset, 0)
    assert sorted(ids) == sorted(ids_in_order[k] for k in chosen)
    held = ShardBatchSource(demo_shards, "train", holdout_fraction=0.25, holdout_role="only", **common)
    assert held.num_rows == 4  # 4, 8, 12, 20 of the chosen rows are held out (every 4th global index)
    with pytest.raises(ValueError, match="rows must index the 24 rows"):
        _ = ShardBatchSource(demo_shards, "train", 32, 2, train=True, rows=[3, 24]).num_rows


@pytest.mark.timeout(300)
def test_batches_inside_a_ray_worker_match_the_driver(ray_session, demo_shards):
    """The engine iterates inside Ray Train workers (actors holding a fraction of a CPU): same rows, same pixels."""
    import pickle

    source = ShardBatchSource(demo_shards, "train", 32, BATCH, train=True, seed=5)

    @ray_session.remote(num_cpus=0.5)
    class Worker:
        def run(self, payload: bytes):
            batches = list(pickle.loads(payload).batches(2, 1, 2, 1))
            return [i for b in batches for i in b["id"]], [b["image"].numpy() for b in batches]

    worker = Worker.remote()
    ids, images = ray_session.get(worker.run.remote(pickle.dumps(source)), timeout=240)
    driver_ids, driver_pixels, _ = _epoch(source, 2, 1, 2, skip=1)
    assert ids == driver_ids and len(ids) == 8
    np.testing.assert_array_equal(np.concatenate(images), driver_pixels.numpy())


@pytest.mark.timeout(300)
def test_validation_batches_and_the_evaluation_suites_see_identical_pixels(demo_shards):
    """One eval preprocessing: ``ShardBatchSource(train=False)`` and the scoring actors' ``decode_batch`` agree on
    every pixel, also where the 32-pixel JPEGs are decoded at reduced scale for a 16-pixel output."""
    from robustfm.evals.data import decode_batch

    rows = _val_rows(demo_shards)
    for size in (16, 32):
        ids, pixels, _ = _epoch(ShardBatchSource(demo_shards, "val", size, BATCH, train=False), 0)
        suites, reasons = decode_batch(rows["image"], rows["id"], size)
        assert ids == rows["id"] and reasons == [None] * len(ids)
        np.testing.assert_array_equal(pixels.numpy(), suites)


def test_a_small_split_read_for_an_actor_pool_comes_in_several_blocks_in_order(demo_shards):
    # 24 train images in 3 shards of ~25 KB: Ray Data would hand them over as one coalesced block, i.e. to one actor.
    whole = [len(b["id"]) for b in open_shards(demo_shards, "train", columns=["id"]).iter_batches(batch_size=None)]
    blocks = open_shards(demo_shards, "train", columns=["id"], min_blocks=8).iter_batches(batch_size=None)
    sizes, ids = [], []
    for block in blocks:
        sizes.append(len(block["id"]))
        ids.extend(str(i) for i in block["id"])
    assert len(sizes) >= 8 and sum(sizes) == 24 and len(whole) < len(sizes)
    in_order = [str(i) for b in open_shards(demo_shards, "train", columns=["id"]).iter_batches() for i in b["id"]]
    assert ids == in_order  # re-blocking keeps the manifest order
