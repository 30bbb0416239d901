"""The recipe kit: the task builder builds any registered method, and a recipe's "pretrained" milestone is the model
its first stage trains from, also for random-init backbones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from robustfm.config import load_config
from robustfm.recipes.cgclip_config import CGClipRecipeConfig
from robustfm.recipes.kit import TaskBuilder

DEMO = Path(__file__).resolve().parents[2] / "configs" / "cgclip" / "demo.yaml"


def _engine_build(cfg: CGClipRecipeConfig) -> torch.nn.Module:
    # What robustfm.train.loop does before the first stage (the recipe passes seed=cfg.seed to the engine).
    torch.manual_seed(cfg.seed)
    return TaskBuilder("cgclip", cfg.model, cfg.method)()


def _initial_task(cfg: CGClipRecipeConfig) -> torch.nn.Module:
    return TaskBuilder("cgclip", cfg.model, cfg.method).initial(cfg.seed)


def test_initial_task_matches_the_engines_random_init_and_leaves_the_global_rng_alone() -> None:
    cfg = load_config(CGClipRecipeConfig, DEMO, ["seed=3", "method.decoder_channels=[16,8,4]"])
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    recipe = _initial_task(cfg)
    after = torch.rand(1)
    engine = _engine_build(cfg)
    for (name, a), (_, b) in zip(recipe.state_dict().items(), engine.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(before, after)  # fork_rng: the caller's random stream is not consumed
    other = load_config(CGClipRecipeConfig, DEMO, ["seed=4", "method.decoder_channels=[16,8,4]"])
    image_key = next(k for k in recipe.state_dict() if "visual" in k and k.endswith("weight"))
    assert not torch.equal(_initial_task(other).state_dict()[image_key], recipe.state_dict()[image_key])


def test_builder_loads_saved_task_weights(tmp_path) -> None:
    from robustfm.models.weights import save_weights

    cfg = load_config(CGClipRecipeConfig, DEMO, ["method.decoder_channels=[16,8,4]"])
    builder = TaskBuilder("cgclip", cfg.model, cfg.method)
    torch.manual_seed(0)
    saved = builder()
    save_weights(saved, tmp_path / "task.safetensors")
    torch.manual_seed(1)  # a different random init: only the file can make the two equal
    loaded = builder.from_weights(tmp_path / "task.safetensors")()
    for (name, a), (_, b) in zip(saved.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert builder.from_weights(None).init_weights is None


def test_eval_milestones_selects_what_is_evaluated_and_caches_only_that(tmp_path) -> None:
    from robustfm.config import ConfigError
    from robustfm.recipes.kit import MilestoneResult, RecipeRun, milestone
    from robustfm.tracking.base import NullRun, NullTracker

    cfg = load_config(CGClipRecipeConfig, DEMO, ["eval.milestones=[pretrained,final]"])
    assert cfg.curriculum == ("adapt", "isolate", "tune")
    run = RecipeRun(cfg, "cgclip", tmp_path, None, NullTracker(), NullRun())
    evaluated = []

    def evaluate(name: str):
        def measure(tracker, run_id):
            evaluated.append(name)
            return MilestoneResult({"score": 1.0}, ())

        return measure

    for name in ["pretrained", "adapt", "adapt-isolate", "adapt-isolate-tune"]:
        milestone(run, name, evaluate(name))
    assert evaluated == ["pretrained", "adapt-isolate-tune"]  # "final" is the whole curriculum's milestone
    assert list(run.milestones) == ["pretrained", "adapt-isolate-tune"]
    assert sorted(p.name for p in (tmp_path / "milestones").iterdir()) == ["adapt-isolate-tune.json", "pretrained.json"]
    # a later run asking for every milestone evaluates the skipped ones, and only those
    everything = RecipeRun(load_config(CGClipRecipeConfig, DEMO), "cgclip", tmp_path, None, NullTracker(), NullRun())
    for name in ["pretrained", "adapt", "adapt-isolate"]:
        milestone(everything, name, evaluate(name))
    assert evaluated == ["pretrained", "adapt-isolate-tune", "adapt", "adapt-isolate"]

    with pytest.raises(ConfigError, match=r"eval\.milestones: is not a milestone of this run .*got 'adapt-tune'"):
        load_config(CGClipRecipeConfig, DEMO, ["eval.milestones=[adapt-tune]"])


def test_a_cached_milestone_is_reused_only_with_the_same_evaluation_settings(tmp_path) -> None:
    import json

    from robustfm.recipes.kit import MilestoneResult, RecipeRun, milestone
    from robustfm.tracking.base import NullRun, NullTracker

    evaluated: list[str] = []

    def measure(tracker, run_id):
        evaluated.append("pretrained")
        return MilestoneResult({"score": float(len(evaluated))}, ())

    def rerun(*overrides: str) -> dict[str, float]:
        cfg = load_config(CGClipRecipeConfig, DEMO, list(overrides))
        return milestone(RecipeRun(cfg, "cgclip", tmp_path, None, NullTracker(), NullRun()), "pretrained", measure)

    assert rerun("eval.enabled=false") == {} and evaluated == []  # a smoke run caches an empty milestone ...
    assert rerun() == {"score": 1.0} and evaluated == ["pretrained"]  # ... that a run with evaluation measures
    assert rerun() == {"score": 1.0} and len(evaluated) == 1  # same settings: cached
    # Pool size and placement, or which other milestones run, do not change the numbers: still cached.
    assert rerun("eval.settings.pool.max_actors=4", "eval.settings.pool.num_cpus=0.5", "eval.milestones=[pretrained]")
    assert len(evaluated) == 1
    # Nor do the training targets: the ablation job runs FLYP-only (no GT maps, scale unset) beside variants that fit
    # the maps' scale, and all of them share the pretrained and Adapt milestones.
    assert rerun("data.gt_map.scale=30.0", "data.gt_map.layers=[1,2]") == {"score": 1.0} and len(evaluated) == 1
    # A suite's setting, the evaluation seed or the data do (each added to the last): measured again, and cached.
    changes = ["eval.settings.suites.zero_shot.data.max_samples=7", "eval.settings.seed=3", "data.image_size=32"]
    for n in range(1, len(changes) + 1):
        assert rerun(*changes[:n]) == {"score": float(n + 1)} and len(evaluated) == n + 1, changes[n - 1]
    assert rerun(*changes) == {"score": 4.0} and len(evaluated) == 4
    # A record written before records carried a fingerprint is measured again.
    cache = tmp_path / "milestones" / "pretrained.json"
    cache.write_text(json.dumps({"metrics": {"score": 0.0}, "artifacts": []}))
    assert rerun() == {"score": 5.0}


def test_stages_with_no_milestone_between_them_are_one_group(tmp_path) -> None:
    from robustfm.recipes.curriculum import stage_groups
    from robustfm.recipes.kit import RecipeRun
    from robustfm.tracking.base import NullRun, NullTracker

    def groups(*overrides: str) -> list[list[str]]:
        cfg = load_config(CGClipRecipeConfig, DEMO, list(overrides))
        return stage_groups(RecipeRun(cfg, "cgclip", tmp_path, None, NullTracker(), NullRun()))

    assert groups() == [["adapt"], ["isolate"], ["tune"]]  # every milestone evaluated (the default)
    assert groups("eval.milestones=[pretrained,final]") == [["adapt", "isolate", "tune"]]
    assert groups("eval.enabled=false") == [["adapt", "isolate", "tune"]]
    assert groups("eval.milestones=[adapt]") == [["adapt"], ["isolate", "tune"]]
    assert groups("eval.milestones=[adapt-isolate]", "curriculum=[adapt,isolate]") == [["adapt", "isolate"]]
    # Weights an earlier run saved (an ablation sharing the prefix) end a group: that part is skipped, not retrained.
    saved = tmp_path / "stages" / "adapt" / "task.safetensors"
    saved.parent.mkdir(parents=True)
    saved.touch()
    assert groups("eval.enabled=false") == [["adapt"], ["isolate", "tune"]]
