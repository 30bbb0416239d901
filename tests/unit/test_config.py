"""Typed configs: merge order, type checks, validation errors that name the field, immutability, saving."""

from __future__ import annotations

import pickle
import subprocess
import sys
from dataclasses import FrozenInstanceError, dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from robustfm.config import (
    ConfigError,
    ModelConfig,
    TrackingConfig,
    check,
    flatten,
    load_config,
    replace_path,
    save_resolved_config,
)


@dataclass(frozen=True)
class StageSketch:
    epochs: int = 1
    lr: float = 1e-3
    groups: tuple[str, ...] = ("decoder",)
    loss_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        check(self.lr >= 0, "lr", self.lr, "must be >= 0")


@dataclass(frozen=True)
class JobSketch:
    seed: int = 0
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    api_token: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    stages: dict[str, StageSketch] = field(default_factory=dict)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_merge_order_defaults_then_yaml_then_overrides(tmp_path):
    cfg_file = write_yaml(tmp_path / "job.yaml", {"seed": 3, "stages": {"adapt": {"epochs": 10, "lr": 1e-6}}})
    cfg = load_config(JobSketch, cfg_file, ["stages.adapt.lr=2e-4", "stages.tune.epochs=5"])
    assert cfg.seed == 3  # YAML over default
    assert cfg.stages["adapt"].epochs == 10  # YAML kept where no override
    assert cfg.stages["adapt"].lr == pytest.approx(2e-4)  # override over YAML ("2e-4" parsed as a number)
    assert cfg.stages["tune"].epochs == 5 and cfg.stages["tune"].lr == pytest.approx(1e-3)  # new entry, defaults
    assert list(cfg.stages) == ["adapt", "tune"]  # YAML order is kept
    assert cfg.model == ModelConfig()  # untouched section = defaults


def test_extends_pulls_a_base_file_first(tmp_path):
    write_yaml(tmp_path / "base.yaml", {"seed": 1, "strategy": "deepspeed"})
    child = write_yaml(tmp_path / "child.yaml", {"extends": "base.yaml", "seed": 2})
    cfg = load_config(JobSketch, child)
    assert (cfg.seed, cfg.strategy) == (2, "deepspeed")


@pytest.mark.parametrize(
    ("overrides", "field_path", "fragment"),
    [
        (["seed=abc"], "seed", "expected an integer, got 'abc'"),
        (["seed=true"], "seed", "expected an integer"),
        (["strategy=dpp"], "strategy", "did you mean 'ddp'"),
        (["stages.tune.epochs=0"], "stages.tune.epochs", "must be >= 1, got 0"),
        (["stages.tune.lr=-1"], "stages.tune.lr", "must be >= 0, got -1.0"),
        (["stages.tune.groups=decoder"], "stages.tune.groups", "expected a list"),
        (["stages.tune.loss_weights.bce=high"], "stages.tune.loss_weights.bce", "expected a number"),
        (["model.name=ViT-B-32"], "model.name", "family/arch"),
        (["tracking.backend=wandb"], "tracking.backend", "must be one of 'mlflow', 'none'"),
        (["modle.name=x"], "modle", "did you mean 'model'"),
        (["stages.tune.lrr=1"], "stages.tune.lrr", "did you mean 'lr'"),
        (["seed"], "seed", "must look like 'key.sub=value'"),
    ],
)
def test_every_validation_error_names_its_field(overrides, field_path, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(JobSketch, None, overrides)
    assert err.value.field == field_path
    assert fragment in str(err.value)
    assert str(err.value).startswith(field_path)


def test_fixed_size_tuples_are_checked_per_position():
    @dataclass(frozen=True)
    class WithBetas:
        betas: tuple[float, float] = (0.9, 0.98)

    assert load_config(WithBetas, None, ["betas=[0.5, 0.9]"]).betas == (0.5, 0.9)
    with pytest.raises(ConfigError, match=r"betas\[1\]: expected a number, got 'x'"):
        load_config(WithBetas, None, ["betas=[0.5, x]"])
    with pytest.raises(ConfigError, match="expected a list of 2 values"):
        load_config(WithBetas, None, ["betas=[0.5]"])


def test_missing_or_broken_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml' does not exist"):
        load_config(JobSketch, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(JobSketch, bad)


def test_resolved_config_is_immutable_and_pickles():
    cfg = load_config(JobSketch, None, ["stages.a.loss_weights.bce=1.5"])
    with pytest.raises(FrozenInstanceError):
        cfg.seed = 4  # type: ignore[misc]
    with pytest.raises(TypeError, match="immutable"):
        cfg.stages["b"] = StageSketch()  # type: ignore[index]
    with pytest.raises(TypeError, match="immutable"):
        cfg.stages["a"].loss_weights["bce"] = 2.0  # type: ignore[index]
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # Ray ships configs to workers by pickling
    changed = replace_path(cfg, "stages.a.lr", 0.5)
    assert changed.stages["a"].lr == 0.5 and cfg.stages["a"].lr == pytest.approx(1e-3)


def test_saved_config_records_git_sha_and_loads_back(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTFM_GIT_SHA", "abc1234")
    cfg = load_config(JobSketch, None, ["seed=7", "stages.tune.lr=3e-4"])
    path = save_resolved_config(cfg, tmp_path / "run")
    text = path.read_text()
    assert "# git_sha: abc1234" in text
    assert load_config(JobSketch, path) == cfg


def test_git_sha_comes_from_the_checkout_when_not_in_env(monkeypatch):
    from robustfm.config import git_sha

    monkeypatch.delenv("ROBUSTFM_GIT_SHA", raising=False)
    repo = Path(__file__).resolve().parents[2]
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:  # a source tree without git history (e.g. an unpacked sdist)
        assert git_sha() == "unknown"
    else:
        assert git_sha().startswith(head.stdout.strip())


def test_flatten_gives_dotted_params():
    cfg = load_config(JobSketch, None, ["stages.t.loss_weights.bce=1.5"])
    flat = flatten(cfg)
    assert flat["stages.t.loss_weights.bce"] == 1.5
    assert flat["model.name"] == "open_clip/tiny-vit"
    assert flat["stages.t.groups"] == ["decoder"]


def test_job_cli_rejects_a_bad_value_with_exit_2(tmp_path):
    """A config error ends a job with the field named and exit status 2, before anything else starts."""
    script = tmp_path / "job.py"
    script.write_text(
        "from robustfm.config import ModelConfig\n"
        "from robustfm.config.cli import parse_job_config\n"
        "parse_job_config(ModelConfig, None, 'demo')\n"
        "print('STARTED')\n"
    )
    done = subprocess.run([sys.executable, str(script), "name=oops"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "config error: name: must look like 'family/arch'" in done.stderr
    assert "STARTED" not in done.stdout
