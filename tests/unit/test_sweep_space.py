"""Search-space files: distribution parsing, validation errors, and checking paths against a recipe's config."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import yaml

from robustfm.config import ConfigError, check, load_config
from robustfm.sweeps.space import Distribution, check_space_against, load_space


@dataclass(frozen=True)
class StageSketch:
    epochs: int = 1
    lr: dict[str, float] = field(default_factory=dict)
    loss_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, weight in self.loss_weights.items():
            check(weight >= 0, f"loss_weights.{name}", weight, "must be >= 0")


@dataclass(frozen=True)
class RecipeSketch:
    stages: dict[str, StageSketch] = field(default_factory=dict)


def write_space(tmp_path, **changes):
    data = {
        "recipe": "cgclip",
        "metric": "val/auroc",
        "searcher": {"type": "optuna_tpe", "seed": 1},
        "scheduler": {"type": "asha", "grace_period": 1},
        "space": {
            "stages.tune.loss_weights.corruption": "loguniform(0.1, 10)",
            "stages.tune.lr.decoder": "uniform(1e-5, 1e-3)",
            "stages.tune.epochs": "choice([1, 2])",
        },
    }
    data.update(changes)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_space_file_parses_into_distributions(tmp_path):
    space = load_space(write_space(tmp_path))
    dists = space.distributions()
    assert dists["stages.tune.loss_weights.corruption"] == Distribution("loguniform", (0.1, 10))
    assert dists["stages.tune.epochs"].values() == [1, 2]
    assert (space.searcher.type, space.scheduler.type, space.mode) == ("optuna_tpe", "asha", "max")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("logunifrom(0.1, 1)", "expected one of"),
        ("loguniform(0, 1)", "loguniform needs low > 0"),
        ("uniform(2, 1)", "needs low < high"),
        ("uniform(1)", "uniform takes 2 arguments, got 1"),
        ("choice([])", "needs a non-empty list"),
        ("uniform(a, b)", "must be literals"),
    ],
)
def test_bad_distribution_names_the_parameter(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as err:
        load_space(write_space(tmp_path, space={"stages.tune.lr.decoder": text}))
    assert err.value.field == "space.stages.tune.lr.decoder"
    assert fragment in str(err.value)


def test_grid_needs_a_grid_capable_searcher(tmp_path):
    path = write_space(tmp_path, space={"stages.tune.epochs": "grid([1, 2])"})
    with pytest.raises(ConfigError, match="searcher.type"):
        load_space(path)


def test_space_paths_are_checked_against_the_recipe_config(tmp_path):
    base = load_config(RecipeSketch, None, ["stages.tune.epochs=1"])
    check_space_against(load_space(write_space(tmp_path)), base)
    typo = load_space(write_space(tmp_path, space={"stages.tune.los_weights.corruption": "uniform(0, 1)"}))
    with pytest.raises(ConfigError, match="did you mean 'loss_weights'") as err:
        check_space_against(typo, base)
    assert err.value.field == "space.stages.tune.los_weights.corruption"
    negative = load_space(write_space(tmp_path, space={"stages.tune.loss_weights.corruption": "uniform(-1, 1)"}))
    with pytest.raises(ConfigError, match="must be >= 0"):
        check_space_against(negative, base)


def test_to_tune_builds_ray_tune_domains():
    from ray import tune

    assert isinstance(Distribution("loguniform", (0.1, 10)).to_tune(), tune.search.sample.Float)
    assert Distribution("grid", ([1, 2],)).to_tune() == {"grid_search": [1, 2]}


def test_trial_restarts_default_to_one_and_cannot_be_negative(tmp_path):
    assert load_space(write_space(tmp_path)).max_trial_failures == 1
    with pytest.raises(ConfigError, match="must be >= 0") as err:
        load_space(write_space(tmp_path, max_trial_failures=-1))
    assert err.value.field == "max_trial_failures"
