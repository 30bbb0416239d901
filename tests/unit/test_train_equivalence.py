"""Data parallelism is exact: 2 processes (DDP, DeepSpeed ZeRO-1/2/3, gloo) follow the 1-process loss trajectory.

The global batch is the same in both cases (the synthetic source splits each global batch over the ranks), so the mean
of the ranks' gradients equals the 1-process gradient up to float32 summation order. Tolerance: every logged loss
within 1e-5 relative (+1e-6 absolute) of the 1-process loss over 16 SGD steps. The negative control sums the ranks'
gradients instead of averaging them (a task whose gradients are scaled by the world size) and must leave it.
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
from robustfm.train.launchers import (
    LocalWorkerContext,
    destroy_local_process_group,
    init_local_process_group,
)
from robustfm.train.loop import train_worker
from robustfm.train.reporting import TrackingSpec
from robustfm.train.synthetic import SyntheticBatchSource, build_tiny_task

RTOL, ATOL = 1e-5, 1e-6
WORLD = 2
CPU = torch.device("cpu")
SOURCE = SyntheticBatchSource(num_samples=128, global_batch_size=16, seed=3)


def _config(strategy: str, zero_stage: int = 0) -> TrainConfig:
    return load_config(
        TrainConfig,
        base={
            "launcher": "local",
            "log_every_steps": 1,
            "seed": 1,
            "optimizer": {"name": "sgd", "momentum": 0.9},
            "strategy": {"name": strategy, "zero_stage": zero_stage},
            "stages": {
                "fit": {
                    "trainable": ["body", "head"],
                    "lr": {"body": 0.05, "head": 0.05},
                    "epochs": 2,
                    "warmup_steps": 2,
                    "loss_weights": {"mse": 1.0, "l1": 0.5},
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


def _losses(summary: dict) -> list[float]:
    return [record["loss/total"] for record in summary["history"]]


def _run_cases(rank: int, world_size: int, port: int, root: str) -> None:
    init_local_process_group(rank, world_size, port, use_gpu=False)
    try:
        results = {}
        for name, (cfg, multiplier) in CASES.items():
            context = LocalWorkerContext(rank, world_size, CPU, f"{root}/{name}", None, keep=1, progress="none")
            build = functools.partial(build_tiny_task, gradient_multiplier=multiplier)
            results[name] = _losses(train_worker(cfg, build, SOURCE, context, TrackingSpec()))
        if rank == 0:
            Path(root, "losses.json").write_text(json.dumps(results))
    finally:
        destroy_local_process_group()


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory) -> dict[str, list[float]]:
    root = tmp_path_factory.mktemp("equivalence")
    mp.spawn(_run_cases, args=(WORLD, free_loopback_port(), str(root)), nprocs=WORLD)
    found = json.loads((root / "losses.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:  # the 1-process reference, in this process
        init_local_process_group(0, 1, free_loopback_port(), use_gpu=False)
        try:
            context = LocalWorkerContext(0, 1, CPU, f"{tmp}/single", None, keep=1, progress="none")
            found["single"] = _losses(train_worker(CASES["ddp"][0], build_tiny_task, SOURCE, context, TrackingSpec()))
        finally:
            destroy_local_process_group()
    return found


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
