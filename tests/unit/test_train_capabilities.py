"""Capabilities: a strategy that cannot train what a task needs is refused at config time, naming the field and why;
``auto`` chooses only among strategies that can. What each strategy can do is found in test_train_equivalence."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from robustfm.config import ConfigError, load_config
from robustfm.methods import METHODS
from robustfm.train import TrainConfig, fit
from robustfm.train.capabilities import (
    CAPABILITIES,
    EVIDENCE,
    STRATEGY_KEYS,
    SUPPORT,
    check_capabilities,
    check_needs,
    supported_strategies,
)
from robustfm.train.strategies import decide_strategy
from robustfm.train.synthetic import SyntheticBatchSource, TinyGradientPenaltyTask

CPU = torch.device("cpu")
PARAMS = {"double_backward_params"}


def _load(*overrides: str, loss_weights: dict | None = None) -> TrainConfig:
    stage = {"trainable": ["head"], "lr": {"head": 1e-3}, "loss_weights": loss_weights or {"mse": 1.0}}
    return load_config(TrainConfig, base=copy.deepcopy({"stages": {"s": stage}}), overrides=list(overrides))


def test_the_table_covers_every_capability_on_every_strategy():
    assert set(SUPPORT) == {(c, k) for c in CAPABILITIES for k in STRATEGY_KEYS}
    assert all(support.finding for support in SUPPORT.values())


@pytest.mark.parametrize("capability", list(CAPABILITIES))
@pytest.mark.parametrize(
    ("overrides", "supported"),
    [
        ((), True),  # auto
        (("strategy.name=ddp",), True),
        (("strategy.name=deepspeed", "strategy.zero_stage=0"), True),
        (("strategy.name=deepspeed", "strategy.zero_stage=1"), True),
        (("strategy.name=deepspeed", "strategy.zero_stage=2"), True),
        (("strategy.name=deepspeed", "strategy.zero_stage=3"), False),
    ],
)
def test_zero3_is_refused_for_double_backward_and_in_task_attacks_with_the_reason(capability, overrides, supported):
    cfg = _load(*overrides)
    check_capabilities(cfg, ())  # a task that needs nothing runs anywhere
    if supported:
        check_capabilities(cfg, {capability})
        return
    with pytest.raises(ConfigError) as err:
        check_capabilities(cfg, {capability}, prefix="train")
    assert err.value.field == "train.strategy.zero_stage"
    message = str(err.value)
    assert f"deepspeed ZeRO-3 does not support {capability}" in message
    reason = "until a GPU run shows it works" if capability == "in_task_attack" else "mat2 must be a matrix"
    assert reason in message and EVIDENCE in message
    assert "ddp, deepspeed ZeRO-0, deepspeed ZeRO-1, deepspeed ZeRO-2" in message  # what to use instead


def test_unknown_capability_names_fail_with_a_suggestion():
    with pytest.raises(ValueError, match="unknown capability 'double_backward_param'.*did you mean"):
        check_needs({"double_backward_param"})
    assert supported_strategies(()) == ["ddp", *(f"deepspeed ZeRO-{s}" for s in range(4))]


def test_every_method_declares_known_needs():
    for name in METHODS:
        assert "needs" in METHODS.meta(name), f"method {name!r} does not declare its needs"
        check_needs(METHODS.meta(name)["needs"])
    assert METHODS.meta("cgclip")["needs"] == ()


def test_auto_never_picks_a_strategy_without_a_needed_capability():
    # 1e9 parameters on a 16 GiB device at 60%: ZeRO-2 fits over 8 workers; on 1 worker only ZeRO-3 would.
    big = _load("strategy.device_memory_gb=16")
    assert decide_strategy(big, 10**9, 10**9, 8, CPU, PARAMS).zero_stage == 2
    assert decide_strategy(big, 10**9, 10**9, 1, CPU).zero_stage == 3
    fallback = decide_strategy(big, 10**9, 10**9, 1, CPU, PARAMS)
    assert (fallback.name, fallback.zero_stage) == ("deepspeed", 2)
    assert "may not fit" in fallback.reason and "deepspeed ZeRO-3 excluded" in fallback.reason
    small = decide_strategy(_load(), 1000, 1000, 2, CPU, PARAMS)
    assert (small.name, small.zero_stage) == ("ddp", 0)


@pytest.fixture
def no_launch(monkeypatch):
    """fit() up to the launch: the launcher raises instead of starting workers."""

    class Launched(Exception):
        pass

    def launch(*args, **kwargs):
        raise Launched

    monkeypatch.setattr(importlib.import_module("robustfm.train.fit"), "run_ray", launch)
    return Launched


def test_fit_refuses_zero3_before_any_worker_starts_only_when_a_stage_needs_double_backward(no_launch):
    zero3 = ("strategy.name=deepspeed", "strategy.zero_stage=3")
    with pytest.raises(ConfigError, match="ZeRO-3 does not support double_backward_params") as err:
        fit(
            _load(*zero3, loss_weights={"mse": 1.0, "param_gradient": 0.1}),
            TinyGradientPenaltyTask,
            SyntheticBatchSource(),
        )
    assert err.value.field == "strategy.zero_stage"
    # The same task with its penalties weighted 0 needs nothing: the config reaches the launcher.
    without = _load(*zero3, loss_weights={"mse": 1.0, "param_gradient": 0.0, "input_gradient": 0.0})
    with pytest.raises(no_launch):
        fit(without, TinyGradientPenaltyTask, SyntheticBatchSource())
