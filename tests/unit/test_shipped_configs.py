"""Every shipped recipe config (configs/<recipe>/*.yaml) loads into its recipe's config class, and every search space
(tune_spaces/*.yaml) checks against its base config: a renamed field fails here, not on a user's cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from robustfm.config import load_config
from robustfm.recipes import RECIPES

REPO = Path(__file__).resolve().parents[2]
RECIPE_CONFIGS = sorted(p for name in RECIPES.names() for p in (REPO / "configs" / name).glob("*.yaml"))
SPACES = sorted((REPO / "tune_spaces").glob("*.yaml"))


def test_every_recipe_ships_configs_and_cft_is_one_of_them():
    shipped = {p.parent.name for p in RECIPE_CONFIGS}
    assert {"cft", "cgclip", "perturb_ft", "fare", "tecoa"} <= shipped


@pytest.mark.parametrize("path", RECIPE_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_recipe_config_loads(path):
    cfg = load_config(RECIPES.meta(path.parent.name)["config"], path)
    assert cfg.curriculum and all(stage in cfg.train.stages for stage in cfg.curriculum)


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_shipped_search_space_checks_against_its_recipe(path):
    from robustfm.sweeps.space import check_space_against, load_space

    space = load_space(path)
    check_space_against(space, load_config(RECIPES.meta(space.recipe)["config"], REPO / space.base_config))
