"""The per-stage hook: the engine calls ``task.configure_stage(StageSpec)`` before each stage, with the stage's name,
config, active losses and method settings; a setting the task does not have fails before any worker starts."""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, field

import pytest

from robustfm.config import ConfigError, load_config
from robustfm.train import StageConfig, TrainConfig, fit
from robustfm.train.synthetic import SyntheticBatchSource, TinyRegressionTask
from robustfm.train.task import StageSpec, Task, stage_settings_applied

SEEN: list[tuple[str, float, frozenset[str]]] = []  # (stage, attack.eps, active losses) at each forward


@dataclass(frozen=True)
class ToyAttack:
    eps: float = 0.25
    steps: int = 1


@dataclass(frozen=True)
class ToyMethodConfig:
    """A method config with a nested section, as a real method's (``attack.eps``)."""

    attack: ToyAttack = field(default_factory=ToyAttack)


class SettingsTask(TinyRegressionTask):
    """Applies the stage's settings to its method config and records what each forward ran with."""

    def __init__(self) -> None:
        super().__init__()
        self.base = ToyMethodConfig()
        self.method = self.base
        self.stage_name = "not configured"

    def configure_stage(self, stage: StageSpec) -> None:
        self.method = stage_settings_applied(self.base, stage)  # from the base: no stage leaks into the next
        self.active_losses = stage.active_losses
        self.stage_name = stage.name

    def forward(self, batch):
        SEEN.append((self.stage_name, self.method.attack.eps, self.active_losses))
        return super().forward(batch)


def _config(storage, settings: dict) -> TrainConfig:
    stages = {  # the stage with settings first: the next one must get the method's own settings back
        "attack": {
            "trainable": ["body"],
            "lr": {"body": 0.01},
            "loss_weights": {"mse": 1.0, "l1": 0.5},
            "settings": settings,
        },
        "plain": {"trainable": ["head"], "lr": {"head": 0.01}, "loss_weights": {"mse": 1.0, "l1": 0.0}},
    }
    base = {"launcher": "local", "storage_path": str(storage), "strategy": {"name": "ddp"}, "stages": stages}
    return load_config(TrainConfig, base=copy.deepcopy(base))


def test_settings_flatten_to_dotted_names_and_default_to_empty():
    stage = {"trainable": ["head"], "lr": {"head": 0.1}, "loss_weights": {"mse": 1.0}}
    assert dict(load_config(TrainConfig, base={"stages": {"s": stage}}).stages["s"].settings) == {}
    nested = load_config(
        TrainConfig,
        base={"stages": {"s": {**stage, "settings": {"attack": {"eps": 0.03, "steps": 3}, "mode": "x"}}}},
        overrides=["stages.s.settings.attack.eps=0.0157"],
    )
    assert dict(nested.stages["s"].settings) == {"attack.eps": 0.0157, "attack.steps": 3, "mode": "x"}
    with pytest.raises(ConfigError) as err:
        StageConfig(
            trainable=("head",), lr={"head": 0.1}, loss_weights={"mse": 1.0}, settings={"a.b": 1, "a": {"b": 2}}
        )
    assert err.value.field == "settings.a.b" and "twice" in str(err.value)


def test_stage_spec_carries_name_config_active_losses_and_settings():
    config = StageConfig(
        trainable=("head",), lr={"head": 0.1}, loss_weights={"mse": 1.0, "l1": 0.0}, settings={"attack.eps": 0.5}
    )
    spec = StageSpec("tune", config)
    assert spec.name == "tune" and spec.config is config
    assert spec.active_losses == frozenset({"mse"}) and dict(spec.settings) == {"attack.eps": 0.5}
    assert stage_settings_applied(ToyMethodConfig(), spec).attack == ToyAttack(eps=0.5, steps=1)
    assert isinstance(SettingsTask(), Task)


def test_the_engine_configures_each_stage_before_it_runs(tmp_path):
    SEEN.clear()
    source = SyntheticBatchSource(num_samples=32, global_batch_size=16)
    fit(_config(tmp_path, {"attack": {"eps": 0.0157}}), SettingsTask, source, run_name="spec")
    seen = {(stage, eps, losses) for stage, eps, losses in SEEN}
    assert seen == {("attack", 0.0157, frozenset({"mse", "l1"})), ("plain", 0.25, frozenset({"mse"}))}
    assert [stage for stage, _, _ in SEEN] == ["attack", "attack", "plain", "plain"]  # 2 steps each, in stage order


@pytest.fixture
def no_launch(monkeypatch):
    def launch(*args, **kwargs):
        raise AssertionError("the launcher must not start")

    monkeypatch.setattr(importlib.import_module("robustfm.train.fit"), "run_local", launch)


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"attack.epz": 0.1}, "stages.attack.settings.attack.epz"),
        ({"attack.steps": "many"}, "stages.attack.settings.attack.steps"),
    ],
)
def test_a_setting_the_task_lacks_fails_before_any_worker_starts(tmp_path, no_launch, settings, field):
    with pytest.raises(ConfigError) as err:
        fit(_config(tmp_path, settings), SettingsTask, SyntheticBatchSource())
    assert err.value.field == field


def test_a_task_without_settings_refuses_them(tmp_path, no_launch):
    with pytest.raises(ConfigError, match="no per-stage settings") as err:
        fit(_config(tmp_path, {"attack.eps": 0.1}), TinyRegressionTask, SyntheticBatchSource())
    assert err.value.field == "stages.attack.settings.attack.eps"
