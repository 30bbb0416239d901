"""Bad CG-CLIP configs fail before Ray starts, naming the field."""

from __future__ import annotations

import pytest

from tests.recipes.conftest import run_job


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.corruption.corruption_set=gausian_noise", "data.corruption.corruption_set: unknown corruption"),
        ("train.stages.tune.loss_weights.corruption=-1.5", "train.stages.tune.loss_weights.corruption: must be >= 0"),
        ("curriculum=[]", "curriculum: must name at least one stage"),
        ("train.stages={}", "train.stages: must hold at least one stage"),
        ("data.shards=/nonexistent/shards", "data.shards: no shards at '/nonexistent/shards'"),
        ("train.strategy.zero_stage=4", "train.strategy.zero_stage: must be 0, 1, 2 or 3"),
        ("model.name=timm/tiny-vit", "model.name: must be an open_clip model"),
        # 16 images per step cannot be split into 3 workers' clean + corrupted pairs (the paper's batch is global)
        ("train.num_workers=3", "data.global_batch_size: must be a positive multiple of 6"),
    ],
)
def test_bad_config_fails_before_ray_starts(override, message):
    done = run_job(["jobs/cgclip.py", "--config", "configs/cgclip/demo.yaml", override], timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr
    assert "Started a local Ray instance" not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.eval_split=test", "data.eval_split: no split 'test'"),
        ("data.ood.caltech.split=val2017", "data.ood.caltech.split: no split 'val2017'"),
    ],
)
def test_a_split_the_shards_lack_fails_before_ray_starts(demo_shards, override, message):
    done = run_job(
        ["jobs/cgclip.py", "--config", "configs/cgclip/demo.yaml", f"data.shards={demo_shards}",
         f"data.ood.caltech.shards={demo_shards}", override],
        timeout=120,
        own_ray=True,  # "before Ray starts": a job joining the session's Ray would start none either way
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and "its splits: train, val" in done.stderr
    assert "Started a local Ray instance" not in done.stdout + done.stderr
