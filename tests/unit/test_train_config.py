"""Engine configs fail at load time with the field named; strategy choice, DeepSpeed config and schedule are right."""

from __future__ import annotations

import copy
import importlib
import math
import sys

import pytest
import torch

from robustfm.config import ConfigError, load_config
from robustfm.train import TrainConfig, fit
from robustfm.train.loop import learning_rate
from robustfm.train.strategies import decide_strategy, deepspeed_config
from robustfm.train.synthetic import SyntheticBatchSource, build_tiny_task

STAGES = {"tune": {"trainable": ["head"], "lr": {"head": 1e-3}, "loss_weights": {"mse": 1.0}}}


def _load(*overrides: str, **base) -> TrainConfig:
    # A deep copy: load_config applies overrides into nested mappings of ``base`` in place.
    return load_config(TrainConfig, base=copy.deepcopy({"stages": STAGES, **base}), overrides=list(overrides))


@pytest.mark.parametrize(
    ("override", "field", "words"),
    [
        ("strategy.name=deepspeeed", "strategy.name", "did you mean 'deepspeed'"),
        ("strategy.zero_stage=4", "strategy.zero_stage", "0, 1, 2 or 3"),
        ("stages.tune.lr.head=-0.001", "stages.tune.lr.head", "positive"),
        ("stages.tune.lr.body=0.1", "stages.tune.lr", "not trainable"),
        ("stages.tune.loss_weights.mse=0", "stages.tune.loss_weights", "positive weight"),
        ("resources_per_worker.CPU=0", "resources_per_worker.CPU", "positive"),
        ("launcher=slurm", "launcher", "one of"),
    ],
)
def test_config_errors_name_the_field(override, field, words):
    with pytest.raises(ConfigError) as err:
        _load(override)
    assert err.value.field == field
    assert words in str(err.value)


def test_a_config_loads_without_importing_ray_or_deepspeed():
    cfg = _load("strategy.name=deepspeed", "strategy.zero_stage=3", "resources_per_worker.CPU=0.5")
    assert cfg.strategy.zero_stage == 3 and cfg.resources_per_worker["CPU"] == 0.5
    code = "import robustfm.train, sys; print(any(m in sys.modules for m in ('ray', 'deepspeed', 'mlflow')))"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_unknown_parameter_group_fails_before_any_worker_starts(monkeypatch):
    fit_module = importlib.import_module("robustfm.train.fit")  # the package attribute ``fit`` is the function

    def no_launch(*args, **kwargs):
        raise AssertionError("the launcher must not start")

    monkeypatch.setattr(fit_module, "run_ray", no_launch)
    cfg = load_config(
        TrainConfig,
        base={"stages": {"s": {"trainable": ["decoder"], "lr": {"decoder": 0.1}, "loss_weights": {"mse": 1.0}}}},
    )
    with pytest.raises(ConfigError, match="stages.s.trainable.*unknown parameter groups"):
        fit(cfg, build_tiny_task, SyntheticBatchSource())


def test_auto_picks_ddp_when_it_fits_and_zero_when_it_does_not():
    cpu = torch.device("cpu")
    fits = decide_strategy(_load(), 1_000_000, 1_000_000, 4, cpu)
    assert (fits.name, fits.zero_stage) == ("ddp", 0) and "fits" in fits.reason
    # 1e9 parameters: 4 GB weights + 12 GB grads/AdamW state; an 16 GiB device at 60% holds only ZeRO-2 over 8 workers.
    big = _load("strategy.device_memory_gb=16")
    assert decide_strategy(big, 10**9, 10**9, 8, cpu).zero_stage == 2
    assert decide_strategy(big, 10**9, 10**9, 1, cpu).zero_stage == 3
    assert decide_strategy(_load("strategy.name=deepspeed", "strategy.zero_stage=1"), 10, 10, 2, cpu).zero_stage == 1


def test_deepspeed_config_is_generated_from_ours():
    bf16 = deepspeed_config(_load("strategy.precision=bf16", "grad_accum_steps=4", "grad_clip=0.5"), 2)
    assert bf16["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "bf16" not in bf16 and "fp16" not in bf16 and "optimizer" not in bf16 and "scheduler" not in bf16
    assert bf16["gradient_accumulation_steps"] == 4 and bf16["gradient_clipping"] == 0.5
    assert bf16["zero_optimization"] == {"stage": 2}
    # ZeRO-1/2 buckets no larger than the trainable parameters (DeepSpeed's 5e8 default up to that size)
    small = deepspeed_config(_load(), 2, trainable_elements=3_000)["zero_optimization"]
    assert small == {"stage": 2, "reduce_bucket_size": 2**20, "allgather_bucket_size": 2**20}
    assert deepspeed_config(_load(), 2, 3_000_001)["zero_optimization"]["reduce_bucket_size"] == 2930 * 1024
    assert deepspeed_config(_load(), 1, 10**10)["zero_optimization"]["reduce_bucket_size"] == 500_000_000
    assert deepspeed_config(_load(), 3, 3_000)["zero_optimization"] == {"stage": 3}
    fp16 = deepspeed_config(_load("strategy.precision=fp16", "use_gpu=true"), 3)
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0 and "torch_autocast" not in fp16
    with pytest.raises(ConfigError, match="fp16 needs use_gpu"):
        _load("strategy.name=deepspeed", "strategy.precision=fp16")


def test_schedule_warms_up_linearly_then_follows_a_cosine():
    stage = _load("stages.tune.warmup_steps=4", "stages.tune.min_lr_ratio=0.1").stages["tune"]
    lrs = [learning_rate(1.0, step, 20, stage) for step in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[12] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False)) and lrs[-1] > 0.1


def test_step_schedule_decays_every_few_epochs_of_the_stage():
    stage = _load("stages.tune.schedule=step", "stages.tune.epochs=5").stages["tune"]
    lrs = [learning_rate(1.0, 3, 20, stage, epoch) for epoch in range(5)]
    assert lrs == pytest.approx([1.0, 1.0, 0.85, 0.85, 0.85**2])  # the CFT authors' lr * 0.85 ** (epoch // 2)
    with pytest.raises(ConfigError, match="stages.tune.step_gamma"):
        _load("stages.tune.schedule=step", "stages.tune.step_gamma=1.5")


def test_the_training_loop_gives_the_step_schedule_its_epoch(tmp_path):
    from robustfm.runtime import free_loopback_port
    from robustfm.train.launchers import LocalWorkerContext, destroy_local_process_group, init_local_process_group
    from robustfm.train.loop import train_worker
    from robustfm.train.reporting import TrackingSpec

    cfg = _load(
        "launcher=local", "log_every_steps=1", "stages.tune.schedule=step", "stages.tune.epochs=3",
        "stages.tune.step_every_epochs=1", "stages.tune.step_gamma=0.5",
    )  # fmt: skip
    init_local_process_group(0, 1, free_loopback_port(), use_gpu=False)
    try:
        context = LocalWorkerContext(0, 1, torch.device("cpu"), str(tmp_path / "run"), None, keep=1, progress="none")
        source = SyntheticBatchSource(num_samples=16, global_batch_size=8)
        summary = train_worker(cfg, build_tiny_task, source, context, TrackingSpec())
    finally:
        destroy_local_process_group()
    lrs = [record["lr/head"] for record in summary["history"]]
    assert lrs == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4])  # two steps per epoch


def test_gpus_per_worker_without_use_gpu_fail_before_ray():
    with pytest.raises(ConfigError, match="resources_per_worker.GPU.*use_gpu is false"):
        _load("resources_per_worker.GPU=1")
