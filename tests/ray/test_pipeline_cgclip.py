"""The CG-CLIP data pipeline on Ray Data with 2 CPUs: shards -> decode -> corrupt -> ground-truth map.

Also the stages alone on in-memory rows: the corrupt stage applies exactly the documented per-sample draws, and the
perturb stage's columns.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustfm.corruptions import CORRUPTION_SETS, corrupt_batch, draw_corruption
from robustfm.data.corruption_stages import build_cgclip_pipeline, corrupt_stage, gt_map_stage, perturb_stage
from robustfm.gtmaps.config import GTMapConfig
from robustfm.seeding import sample_seed

pytestmark = [pytest.mark.ray]

SIZE = 32
# A random (seeded) VGG cut after block 2 keeps the actor fast; the actor path is the same as for real weights.
GT_MAP = GTMapConfig(
    name="vgg16_l1", weights=None, layers=(1, 2), scale=0.5, min_actors=1, max_actors=1, batch_size=8, num_cpus=0.5
)


@pytest.fixture(scope="module")
def shards(ray_session, tmp_path_factory) -> str:
    from robustfm.testing.datasets import write_demo_shards

    return str(
        write_demo_shards(tmp_path_factory.mktemp("cgclip_shards"), image_size=48, n_images=16, n_val=4, shard_size=8)
    )


def _rows_by_id(ds) -> dict[str, dict]:
    return {str(row["id"]): row for row in ds.take_all()}


def _pipeline(shards: str):
    return build_cgclip_pipeline(
        shards, "train", image_size=SIZE, corruption_set="seen", gt_map=GT_MAP, seed=3, epoch=0
    )


@pytest.fixture(scope="module")
def two_runs(shards) -> tuple[dict[str, dict], dict[str, dict]]:
    """Two runs of the same pipeline; the first also maps each clean image against itself ("clean_map")."""
    clean_against_clean = gt_map_stage(
        GT_MAP.name,
        GT_MAP.weights,
        GT_MAP.layers,
        GT_MAP.scale,
        batch_size=8,
        num_cpus=0.5,
        corrupted_column="image",
        output_column="clean_map",
    )
    first = _rows_by_id(clean_against_clean(_pipeline(shards), 0))
    second = _rows_by_id(_pipeline(shards))
    return first, second


@pytest.mark.timeout(400)
def test_pipeline_columns_and_dtypes(two_runs):
    first, _ = two_runs
    assert len(first) == 16
    for row in first.values():
        assert {"image", "corrupted", "map", "corruption", "severity", "id", "label", "captions", "epoch"} <= set(row)
        assert row["image"].shape == (3, SIZE, SIZE) and row["image"].dtype == np.float32
        assert row["corrupted"].shape == (3, SIZE, SIZE) and row["corrupted"].dtype == np.float32
        assert row["map"].shape == (1, SIZE, SIZE) and row["map"].dtype == np.float32
        assert 0 <= row["map"].min() and row["map"].max() <= 1 and row["map"].mean() > 0
        assert row["corruption"] in CORRUPTION_SETS["seen"] and 1 <= int(row["severity"]) <= 5
        assert 0 <= row["corrupted"].min() and row["corrupted"].max() <= 1
        assert int(row["epoch"]) == 0
    # The draws are the documented per-sample ones.
    for sample_id, row in first.items():
        expected = draw_corruption(sample_seed(sample_id, 0, "corruption", 3), CORRUPTION_SETS["seen"])
        assert (row["corruption"], int(row["severity"])) == expected


@pytest.mark.timeout(400)
def test_pipeline_is_deterministic_across_runs(two_runs):
    first, second = two_runs
    assert first.keys() == second.keys()
    for sample_id, row in first.items():
        again = second[sample_id]
        assert (row["corruption"], row["severity"]) == (again["corruption"], again["severity"])
        for column in ("image", "corrupted", "map"):
            assert np.array_equal(row[column], again[column]), f"{sample_id}: {column} differs between runs"


@pytest.mark.timeout(400)
def test_clean_images_get_zero_maps(two_runs):
    first, _ = two_runs
    assert all(np.count_nonzero(row["clean_map"]) == 0 for row in first.values())
    assert all(row["map"].max() > 0 for row in first.values())


def _memory_rows(ray, n: int = 6):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, SIZE, SIZE, generator=generator).numpy()
    return ray.data.from_items(
        [{"id": f"img{i}", "image": images[i], "captions": ["a", "b"]} for i in range(n)]
    ), images


@pytest.mark.timeout(120)
def test_corrupt_stage_applies_the_documented_draws(ray_session):
    ds, images = _memory_rows(ray_session)
    rows = sorted(
        corrupt_stage(["gaussian_noise", "pixelate"], (2, 4), run_seed=5)(ds, 7).take_all(), key=lambda r: r["id"]
    )
    ids = [r["id"] for r in rows]
    picks = [draw_corruption(sample_seed(i, 7, "corruption", 5), ["gaussian_noise", "pixelate"], (2, 4)) for i in ids]
    expected = corrupt_batch(
        torch.from_numpy(images),
        [p[0] for p in picks],
        [p[1] for p in picks],
        [sample_seed(i, 7, "corruption_draws", 5) for i in ids],
    ).numpy()
    assert [(r["corruption"], int(r["severity"])) for r in rows] == picks
    # Same draws; the driver and a 1-thread Ray worker may round matmul-based corruptions (pixelate) differently.
    assert np.allclose(np.stack([r["corrupted"] for r in rows]), expected, rtol=0, atol=1e-6)
    assert all(list(r["captions"]) == ["a", "b"] for r in rows)
    next_epoch = sorted(
        corrupt_stage(["gaussian_noise", "pixelate"], (2, 4), run_seed=5)(ds, 8).take_all(), key=lambda r: r["id"]
    )
    pairs = list(zip(rows, next_epoch, strict=True))
    assert any((a["corruption"], a["severity"]) != (b["corruption"], b["severity"]) for a, b in pairs)
    assert all(
        not np.array_equal(a["corrupted"], b["corrupted"])
        for a, b in zip(rows, next_epoch, strict=True)
        if a["corruption"] == b["corruption"] == "gaussian_noise"
    )


@pytest.mark.timeout(120)
def test_perturb_stage_adds_one_image_per_value(ray_session):
    ds, images = _memory_rows(ray_session)
    rows = sorted(perturb_stage("brightness", 3)(ds, 0).take_all(), key=lambda r: r["id"])
    for row, image in zip(rows, images, strict=True):
        assert row["perturbed"].shape == (3, 3, SIZE, SIZE) and row["perturbed"].dtype == np.float32
        assert row["perturbation"] == "brightness"
        assert np.allclose(row["perturbation_values"], [0.4, 1.0, 1.6])
        assert np.array_equal(row["perturbed"][1], image)  # the identity in the middle of the sweep
        assert np.allclose(row["perturbed"][0], image * 0.4, atol=1e-6)
    noisy_a = sorted(perturb_stage("gaussian_noise", [0.1])(ds, 0).take_all(), key=lambda r: r["id"])
    noisy_b = sorted(perturb_stage("gaussian_noise", [0.1])(ds, 0).take_all(), key=lambda r: r["id"])
    assert all(np.array_equal(a["perturbed"], b["perturbed"]) for a, b in zip(noisy_a, noisy_b, strict=True))
    assert not np.array_equal(noisy_a[0]["perturbed"], noisy_a[1]["perturbed"])


def test_stage_arguments_are_checked_before_ray_runs():
    from robustfm.config.core import ConfigError
    from robustfm.registry import UnknownNameError

    with pytest.raises(UnknownNameError, match="did you mean 'gaussian_noise'"):
        corrupt_stage(["gausian_noise"])
    with pytest.raises(ConfigError, match="max_actors"):
        gt_map_stage("pixel_l1", min_actors=2, max_actors=1, layers=None)
    with pytest.raises(UnknownNameError):
        perturb_stage("brightnes", 3)
