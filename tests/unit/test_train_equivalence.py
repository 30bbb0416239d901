"""Data parallelism is exact: 2 processes (DDP, DeepSpeed ZeRO-1/2/3, gloo) follow the 1-process loss trajectory.

The global batch is the same in both cases (the synthetic source splits each global batch over the ranks), so the mean
of the ranks' gradients equals the 1-process gradient up to float32 summation order. Tolerance: every logged loss
within 1e-5 relative (+1e-6 absolute) of the 1-process loss over 16 SGD steps. The negative control sums the ranks'
gradients instead of averaging them (a task whose gradients are scaled by the world size) and must leave it.

The same spawned run also finds out which strategies train a loss differentiated through a gradient (double
backward, :class:`~robustfm.train.synthetic.TinyGradientPenaltyTask`): an input-gradient and a parameter-gradient
penalty; and a loss at points an attack found inside ``forward`` (:class:`~robustfm.train.synthetic.TinyAttackTask`,
PGD w.r.t. the input, as FARE and TeCoA train), on DDP and ZeRO-0..3, also with gradient accumulation and DDP's
``find_unused_parameters``. A strategy passes when its losses and its parameters after the stage equal one process's
within the same tolerance; the table of :mod:`robustfm.train.capabilities` must say what was found here.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from robustfm.config import load_config
from robustfm.runtime import free_loopback_port
from robustfm.train import TrainConfig
from robustfm.train.capabilities import SUPPORT
from robustfm.train.launchers import (
    LocalWorkerContext,
    destroy_local_process_group,
    init_local_process_group,
)
from robustfm.train.loop import train_worker
from robustfm.train.reporting import TrackingSpec
from robustfm.train.synthetic import SyntheticBatchSource, TinyAttackTask, build_tiny_task

RTOL, ATOL = 1e-5, 1e-6
WORLD = 2
CPU = torch.device("cpu")
SOURCE = SyntheticBatchSource(num_samples=128, global_batch_size=16, seed=3)


def _config(
    strategy: str,
    zero_stage: int = 0,
    loss_weights: dict[str, float] | None = None,
    epochs: int = 2,
    grad_accum_steps: int = 1,
    find_unused_parameters: bool = False,
) -> TrainConfig:
    return load_config(
        TrainConfig,
        base={
            "launcher": "local",
            "log_every_steps": 1,
            "seed": 1,
            "grad_accum_steps": grad_accum_steps,
            "optimizer": {"name": "sgd", "momentum": 0.9},
            "strategy": {"name": strategy, "zero_stage": zero_stage, "find_unused_parameters": find_unused_parameters},
            "stages": {
                "fit": {
                    "trainable": ["body", "head"],
                    "lr": {"body": 0.05, "head": 0.05},
                    "epochs": epochs,
                    "warmup_steps": 2,
                    "loss_weights": loss_weights or {"mse": 1.0, "l1": 0.5},
                }
            },
        },
    )


CASES = {
    "ddp": (_config("ddp"), 1.0),
    "zero1": (_config("deepspeed", 1), 1.0),
    "zero2": (_config("deepspeed", 2), 1.0),
    "zero3": (_config("deepspeed", 3), 1.0),
    "ddp_summed_gradients": (_config("ddp"), float(WORLD)),  # the negative control
}

# Capabilities: (capability, strategy key, variant) -> config. The capability's loss has a tenth of the MSE's weight.
PENALTY_LOSS = {
    "double_backward_input": "input_gradient",
    "double_backward_params": "param_gradient",
    "in_task_attack": "adversarial",
}
STRATEGY_ARGS = {"ddp": ("ddp", 0), "zero0": ("deepspeed", 0), "zero1": ("deepspeed", 1)}
STRATEGY_ARGS |= {"zero2": ("deepspeed", 2), "zero3": ("deepspeed", 3)}
VARIANTS = {"plain": {}, "accum2": {"grad_accum_steps": 2}, "find_unused": {"find_unused_parameters": True}}
VARIANT_STRATEGIES = {"plain": tuple(STRATEGY_ARGS), "accum2": ("ddp", "zero1", "zero2"), "find_unused": ("ddp",)}


def _penalty_config(capability: str, key: str = "ddp", variant: str = "plain", penalty_weight: float = 0.1):
    weights = {"mse": 1.0, PENALTY_LOSS[capability]: penalty_weight}
    return _config(*STRATEGY_ARGS[key], loss_weights=weights, epochs=1, **VARIANTS[variant])


# ZeRO-3 last: a case that fails must not run before one that should pass.
CAPABILITY_CASES = {
    f"{capability}/{key}/{variant}": _penalty_config(capability, key, variant)
    for key in STRATEGY_ARGS
    for variant in VARIANTS
    if key in VARIANT_STRATEGIES[variant]
    for capability in PENALTY_LOSS
}


def _losses(summary: dict) -> list[float]:
    return [record["loss/total"] for record in summary["history"]]


def _train(cfg: TrainConfig, build, rank: int, world_size: int, run_path: str) -> tuple[list[float], dict | None]:
    """(logged losses, the task's state after the stage on rank 0)."""
    final = {}

    def keep(stage, state, metrics):
        final["state"] = state

    context = LocalWorkerContext(rank, world_size, CPU, run_path, None, keep=1, progress="none")
    summary = train_worker(cfg, build, SOURCE, context, TrackingSpec(), on_stage_end=keep)
    return _losses(summary), final.get("state")


def _run_cases(rank: int, world_size: int, port: int, root: str) -> None:
    init_local_process_group(rank, world_size, port, use_gpu=False)
    try:
        results = {}
        for name, (cfg, multiplier) in CASES.items():
            context = LocalWorkerContext(rank, world_size, CPU, f"{root}/{name}", None, keep=1, progress="none")
            build = functools.partial(build_tiny_task, gradient_multiplier=multiplier)
            results[name] = _losses(train_worker(cfg, build, SOURCE, context, TrackingSpec()))
        outcomes = {}
        for name, cfg in CAPABILITY_CASES.items():
            try:
                losses, state = _train(cfg, TinyAttackTask, rank, world_size, f"{root}/{name}")
                outcomes[name] = {"losses": losses, "state": state, "error": None}
            except Exception as err:  # a strategy without the capability may raise: recorded, judged by the test
                outcomes[name] = {"losses": [], "state": None, "error": f"{type(err).__name__}: {err}"}
        if rank == 0:
            Path(root, "losses.json").write_text(json.dumps(results))
            torch.save(outcomes, Path(root, "double_backward.pt"))
    finally:
        destroy_local_process_group()


def _deviation(found: np.ndarray, reference: np.ndarray) -> float:
    """Largest distance from the reference, in units of the tolerance (<= 1: equal)."""
    return float(np.max(np.abs(found - reference) / (ATOL + RTOL * np.abs(reference))))


def _state_deviation(found: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    assert found.keys() == reference.keys()
    return max(_deviation(found[k].numpy(), reference[k].numpy()) for k in reference)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> Path:
    """One spawn of 2 processes runs every case (spawning and DeepSpeed's start are the cost)."""
    root = tmp_path_factory.mktemp("equivalence")
    mp.spawn(_run_cases, args=(WORLD, free_loopback_port(), str(root)), nprocs=WORLD)
    return root


@pytest.fixture(scope="module")
def trajectories(spawned) -> dict[str, list[float]]:
    found = json.loads((spawned / "losses.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:  # the 1-process reference, in this process
        init_local_process_group(0, 1, free_loopback_port(), use_gpu=False)
        try:
            context = LocalWorkerContext(0, 1, CPU, f"{tmp}/single", None, keep=1, progress="none")
            found["single"] = _losses(train_worker(CASES["ddp"][0], build_tiny_task, SOURCE, context, TrackingSpec()))
        finally:
            destroy_local_process_group()
    return found


@pytest.fixture(scope="module")
def double_backward(spawned) -> dict:
    """The 2-process runs, the 1-process references (by capability and accumulation) and the controls."""
    runs = torch.load(spawned / "double_backward.pt", weights_only=True)
    # A rank's parameter-gradient penalty is of its own half of the batch: one process cuts its batch in two.
    halves = functools.partial(TinyAttackTask, penalty_chunks=WORLD)
    references, controls = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        init_local_process_group(0, 1, free_loopback_port(), use_gpu=False)
        try:
            for capability in PENALTY_LOSS:
                for variant in ("plain", "accum2"):
                    cfg = _penalty_config(capability, variant=variant)
                    references[capability, variant] = _train(cfg, halves, 0, 1, f"{tmp}/{capability}-{variant}")
            cfg = _penalty_config("double_backward_input", penalty_weight=0.0)
            controls["without_input_penalty"] = _train(cfg, halves, 0, 1, f"{tmp}/without")
            cfg = _penalty_config("double_backward_params")
            controls["whole_batch_penalty"] = _train(cfg, TinyAttackTask, 0, 1, f"{tmp}/whole")
            weak = functools.partial(TinyAttackTask, penalty_chunks=WORLD, attack_eps=1e-7)
            controls["negligible_attack"] = _train(_penalty_config("in_task_attack"), weak, 0, 1, f"{tmp}/weak")
        finally:
            destroy_local_process_group()
    return {"runs": runs, "references": references, "controls": controls}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["ddp", "zero1", "zero2", "zero3"])
def test_two_processes_follow_the_single_process_trajectory(trajectories, case):
    single, parallel = np.array(trajectories["single"]), np.array(trajectories[case])
    assert len(single) == len(parallel) == 16
    assert single[-4:].mean() < single[:4].mean()  # it trains
    np.testing.assert_allclose(parallel, single, rtol=RTOL, atol=ATOL, err_msg=f"{case} diverged from 1 process")


@pytest.mark.timeout(300)
def test_summed_gradients_break_the_tolerance(trajectories):
    single, summed = np.array(trajectories["single"]), np.array(trajectories["ddp_summed_gradients"])
    assert summed[0] == pytest.approx(single[0], rel=RTOL)  # same start: the loss values are not what differs
    deviation = np.max(np.abs(summed - single) / (ATOL + RTOL * np.abs(single)))
    assert deviation > 100, f"summing gradients moved the trajectory by only {deviation:.1f}x the tolerance"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(CAPABILITY_CASES))
def test_the_capability_table_says_what_two_processes_do(double_backward, case):
    capability, key, variant = case.split("/")
    run = double_backward["runs"][case]
    reference_losses, reference_state = double_backward["references"][
        capability, "accum2" if "accum2" in case else "plain"
    ]
    assert len(reference_losses) == (4 if variant == "accum2" else 8)
    if run["error"] is not None:
        found = f"it raised {run['error']}"
        same = False
    else:
        loss_deviation = _deviation(np.array(run["losses"]), np.array(reference_losses))
        state_deviation = _state_deviation(run["state"], reference_state)
        found = f"losses {loss_deviation:.3g}x and parameters {state_deviation:.3g}x the tolerance away from 1 process"
        same = len(run["losses"]) == len(reference_losses) and max(loss_deviation, state_deviation) <= 1
    support = SUPPORT[capability, key]
    assert same == support.expected_on_cpu, (
        f"{case}: {found}, but robustfm/train/capabilities.py expects a match={support.expected_on_cpu} on CPU "
        f"(supported={support.supported}: {support.finding})"
    )


@pytest.mark.timeout(300)
def test_the_penalties_move_the_parameters_and_a_parameter_gradient_is_the_rank_s_own(double_backward):
    references, controls = double_backward["references"], double_backward["controls"]
    with_penalty = references["double_backward_input", "plain"][1]
    assert _state_deviation(with_penalty, controls["without_input_penalty"][1]) > 100
    # Two ranks equal one process that penalises each half of its batch, not the gradient of the whole batch.
    halves = references["double_backward_params", "plain"][1]
    assert _state_deviation(halves, controls["whole_batch_penalty"][1]) > 100
    # The attack moves the points the adversarial loss is taken at: with a negligible radius training differs.
    attacked = references["in_task_attack", "plain"][1]
    assert _state_deviation(attacked, controls["negligible_attack"][1]) > 100
