"""Ablation presets apply over any base config and keep everything but the curriculum."""

from __future__ import annotations

from pathlib import Path

import pytest

from robustfm.config import ConfigError, load_config
from robustfm.recipes.cgclip_ablations import load_variants
from robustfm.recipes.cgclip_config import CGClipRecipeConfig

REPO = Path(__file__).resolve().parents[2]
PRESETS = REPO / "configs" / "cgclip" / "ablations"


def test_every_preset_applies_over_the_demo_base():
    base = load_config(CGClipRecipeConfig, REPO / "configs" / "cgclip" / "demo.yaml")
    variants = load_variants(base, PRESETS)
    assert {name: v.curriculum for name, v in variants.items()} == {
        "cgclip": ("adapt", "isolate", "tune"),
        "flyp_only": ("adapt",),
        "joint": ("joint",),
        "no_isolate": ("adapt", "tune"),
        "no_tune": ("adapt", "isolate"),
    }
    for variant in variants.values():  # the base's settings (tiny model, demo data) win over the presets' `extends`
        assert variant.model == base.model and variant.train.stages == base.train.stages
        assert variant.export.wise_ft_alphas == ()


def test_each_preset_also_runs_standalone_over_the_paper_config():
    for preset in PRESETS.glob("*.yaml"):
        cfg = load_config(CGClipRecipeConfig, preset)
        assert cfg.model.name == "open_clip/ViT-B-32" and cfg.curriculum


def test_unknown_preset_is_named():
    base = load_config(CGClipRecipeConfig, REPO / "configs" / "cgclip" / "demo.yaml")
    with pytest.raises(ConfigError, match="unknown ablation 'no_adapt'"):
        load_variants(base, PRESETS, ["no_adapt"])
