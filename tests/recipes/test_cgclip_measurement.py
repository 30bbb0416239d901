"""CG-CLIP measured as paper 000 measures it: the ground-truth scale fitted for the configured network, and one source
of zero-shot prompts for milestones and sweeps."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from robustfm.config import load_config
from robustfm.recipes.cgclip_config import CGClipRecipeConfig
from tests.recipes.conftest import REPO

pytestmark = [pytest.mark.ray]
DEMO = REPO / "configs" / "cgclip" / "demo.yaml"


def _config(shards: str, *overrides: str) -> CGClipRecipeConfig:
    return load_config(CGClipRecipeConfig, DEMO, [f"data.shards={shards}", *overrides])


@pytest.fixture
def own_shards(demo_shards, tmp_path):
    """A private copy of the demo shards: the fitted scale is cached beside them."""
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(demo_shards, copy)
    return str(copy)


def test_fitted_scale_keeps_demo_maps_below_saturation_and_is_cached(own_shards, monkeypatch):
    from robustfm.gtmaps import build_gt_mapper
    from robustfm.gtmaps.fit import SATURATED_SHARE, check_scale
    from robustfm.recipes import cgclip
    from robustfm.recipes.cgclip import first_evaluation_batch, with_fitted_gt_scale

    cfg = _config(own_shards, "data.gt_map.scale=null")
    fitted = with_fitted_gt_scale(cfg)
    scale = fitted.data.gt_map.scale
    assert scale is not None and scale > 0
    gt = cfg.data.gt_map
    batch = first_evaluation_batch(cfg.data, cfg.data.train_split, cfg.seed, seed=cfg.seed, max_images=gt.fit_images)
    mapper = build_gt_mapper(gt.name, weights=gt.weights, layers=gt.layers, scale=1.0)
    found = check_scale(mapper, batch["image"].float(), batch["corrupted"].float(), scale)
    assert found.saturated_share < SATURATED_SHARE and found.problem is None, found
    # The old fixed default (fitted for HED's weights with a channel mean) saturates these maps past the threshold.
    old = check_scale(mapper, batch["image"].float(), batch["corrupted"].float(), 12.37)
    assert old.saturated_share > SATURATED_SHARE and "saturate" in old.problem

    def no_refit(*args, **kwargs):
        raise AssertionError("the cached scale must be reused")

    monkeypatch.setattr("robustfm.gtmaps.fit.fit_map_scale", no_refit)
    assert cgclip.with_fitted_gt_scale(cfg).data.gt_map.scale == scale


def test_a_given_scale_that_saturates_the_maps_is_warned_about(own_shards, caplog):
    from robustfm.recipes.cgclip import with_fitted_gt_scale

    with caplog.at_level(logging.WARNING, logger="robustfm.recipes.cgclip"):
        cfg = with_fitted_gt_scale(_config(own_shards, "data.gt_map.scale=1.0e-6"))
    assert cfg.data.gt_map.scale == 1.0e-6
    assert "saturate at 1 with scale 1e-06" in caplog.text


def test_milestone_and_sweep_detectors_ask_with_the_same_prompts(demo_shards):
    """The zero-shot detector a milestone scores with (the suite, in the recipe's settings) and the one a sweep
    validates with give the same AUROC on the same weights and images: one source of prompts, the method's."""
    import torch

    from robustfm.evals.metrics import detection_metrics
    from robustfm.evals.suites.corruption_detection import ZeroShotDetector
    from robustfm.recipes.cgclip import SWEEP, milestone_eval_settings
    from robustfm.recipes.kit import TaskBuilder

    cfg = _config(
        demo_shards, "method.clean_prompts=[a pristine picture]", "method.corrupt_prompts=[a damaged picture]"
    )
    suite = milestone_eval_settings(cfg).suites["corruption_detection"]
    assert suite.clean_prompts == ("a pristine picture",) and suite.corrupt_prompts == ("a damaged picture",)

    builder = TaskBuilder("cgclip", cfg.model, cfg.method)
    validation = SWEEP.validation(cfg, builder)
    torch.manual_seed(0)
    task = builder().eval()
    with torch.no_grad():
        swept = validation.measure(task)["val/auroc"]
        clean, corrupted = validation.held_out("image", "corrupted")
        clip = task.model.clip
        embeddings = clip.encode_image(torch.cat([clean, corrupted]), normalize=True).double().numpy()
        detector = ZeroShotDetector.of(clip, suite.clean_prompts, suite.corrupt_prompts)
    labels = [0] * len(clean) + [1] * len(corrupted)
    assert detection_metrics(labels, detector.p_corrupt(embeddings))["auroc"] == pytest.approx(swept, abs=1e-12)
    suite_prompts = dataclasses.replace(cfg, detection_prompts="suite")
    assert milestone_eval_settings(suite_prompts).suites["corruption_detection"].clean_prompts != suite.clean_prompts
