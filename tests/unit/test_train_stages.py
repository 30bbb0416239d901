"""Stages freeze for real, and a run killed mid-stage resumes to the same weights (local launcher, one process).

Run per strategy (DDP, DeepSpeed ZeRO-2 and ZeRO-3): stage ``head`` trains the head for 4 steps, stage ``body``
trains the body for 8 steps (2 epochs). The uninterrupted run is shared by the freezing, resume and bf16 tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from robustfm.config import load_config
from robustfm.train import TrainConfig, fit
from robustfm.train.checkpoint import read_state
from robustfm.train.loop import InjectedFault
from robustfm.train.strategies import _deepspeed_safe_globals
from robustfm.train.synthetic import SyntheticBatchSource, build_tiny_task

SOURCE = SyntheticBatchSource(num_samples=64, global_batch_size=16, seed=5)
HEAD_NUMEL = 32 * 4 + 4
STRATEGIES = {
    "ddp": {"name": "ddp"},
    "zero2": {"name": "deepspeed", "zero_stage": 2},
    "zero3": {"name": "deepspeed", "zero_stage": 3},
}
# Where each ZeRO stage keeps a rank's fp32 master partitions in its optimizer shard.
FP32_PARTITIONS = {"zero2": "single_partition_of_fp32_groups", "zero3": "fp32_flat_groups"}


def _config(strategy: str, storage: Path, precision: str = "fp32", **extra) -> TrainConfig:
    return load_config(
        TrainConfig,
        base={
            "launcher": "local",
            "storage_path": str(storage),
            "log_every_steps": 1,
            "seed": 2,
            "checkpoint_every_steps": 3,
            "keep_checkpoints": None,
            "strategy": {**STRATEGIES[strategy], "precision": precision},
            "stages": {
                "head": {"trainable": ["head"], "lr": {"head": 0.01}, "loss_weights": {"mse": 1.0}},
                "body": {
                    "trainable": ["body"],
                    "lr": {"body": 0.005},
                    "weight_decay": {"body": 0.1},
                    "epochs": 2,
                    "warmup_steps": 2,
                    "loss_weights": {"mse": 1.0, "l1": 0.5},
                },
            },
            **extra,
        },
    )


def _initial_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in build_tiny_task().state_dict().items()}


@pytest.fixture(scope="module", params=list(STRATEGIES))
def uninterrupted(request, tmp_path_factory):
    storage = tmp_path_factory.mktemp(f"stages-{request.param}")
    stage_states: dict[str, dict[str, torch.Tensor]] = {}

    def keep_state(stage, state, metrics):
        stage_states[stage] = state
        return {"stage_end_loss": metrics["loss/total"]}

    result = fit(_config(request.param, storage), build_tiny_task, SOURCE, run_name="full", on_stage_end=keep_state)
    return request.param, storage, result, stage_states


def _split(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(300)
def test_frozen_groups_stay_bit_identical_and_trainable_ones_move(uninterrupted):
    strategy, storage, result, states = uninterrupted
    initial = _initial_state(seed=2)
    after_head, after_body = states["head"], states["body"]
    assert _equal(_split(after_head, "body."), _split(initial, "body."))
    assert not _equal(_split(after_head, "head."), _split(initial, "head."))
    assert _equal(_split(after_body, "head."), _split(after_head, "head."))
    assert not _equal(_split(after_body, "body."), _split(after_head, "body."))
    assert _equal(result.load_state_dict(), after_body)  # the export is the final model
    assert result.metrics["global_step"] == 12 and result.metrics["strategy"] == STRATEGIES[strategy]["name"]
    assert result.metrics["head/stage_end_loss"] == pytest.approx(result.metrics["head/loss/total"])


@pytest.mark.timeout(300)
def test_frozen_parameters_hold_no_optimizer_state(uninterrupted):
    strategy, storage, result, _ = uninterrupted
    mid_head = Path(result.run_path) / "checkpoint_step_000000003"  # taken inside stage "head"
    assert not read_state(mid_head).position.stage_complete
    if strategy == "ddp":
        state = torch.load(mid_head / "optimizer.pt", weights_only=True)["optimizer"]
        shapes = sorted(tuple(s["exp_avg"].shape) for s in state["state"].values())
        assert shapes == [(4,), (4, 32)]  # only the head's weight and bias
    else:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            shard = torch.load(next((mid_head / "deepspeed" / "state").glob("*optim_states.pt")), weights_only=True)
        partitions = shard["optimizer_state_dict"][FP32_PARTITIONS[strategy]]
        assert sum(p.numel() for p in partitions) == HEAD_NUMEL


@pytest.mark.timeout(300)
def test_run_killed_mid_stage_resumes_to_the_same_weights(uninterrupted, tmp_path):
    strategy, _, reference, _ = uninterrupted
    # Fault after step 7: stage "body", epoch 0, batch 3 of 4; the newest checkpoint is step 6 (mid-epoch).
    cfg = _config(strategy, tmp_path, fail_at_step=7)
    with pytest.raises(InjectedFault):
        fit(cfg, build_tiny_task, SOURCE, run_name="killed")
    resumed = fit(cfg, build_tiny_task, SOURCE, run_name="killed")
    assert resumed.metrics["global_step"] == 12
    assert _equal(resumed.load_state_dict(), reference.load_state_dict())
    assert [r["loss/total"] for r in resumed.history] == [r["loss/total"] for r in reference.history]


@pytest.mark.timeout(300)
def test_rank0_logs_one_nested_tracking_run_per_stage(tmp_path):
    from mlflow.tracking import MlflowClient

    from robustfm.config import TrackingConfig
    from robustfm.tracking import create_tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = create_tracker(TrackingConfig(uri=uri, experiment="engine"), uri)
    parent = tracker.start_run("parent")
    fit(
        _config("ddp", tmp_path),
        build_tiny_task,
        SOURCE,
        tracking_uri=uri,
        experiment="engine",
        parent_run_id=parent.run_id,
        run_name="tracked",
    )
    parent.end()
    tracker.close()
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("engine")
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert sorted(run.info.run_name for run in children) == ["tracked/body", "tracked/head"]
    body = next(run for run in children if run.info.run_name == "tracked/body")
    assert body.data.params["strategy"] == "ddp" and body.data.params["trainable"] == "body"
    steps = [m.step for m in client.get_metric_history(body.info.run_id, "loss/total")]
    assert steps == list(range(5, 13))  # one point per optimizer step of the stage (log_every_steps=1)
    assert {"lr/body", "lr/body/no_decay", "samples_per_s", "step_time_ms"} <= set(body.data.metrics)


@pytest.mark.timeout(300)
def test_bf16_autocast_trains_with_fp32_weights(uninterrupted, tmp_path):
    strategy, _, reference, _ = uninterrupted
    bf16 = fit(_config(strategy, tmp_path, precision="bf16"), build_tiny_task, SOURCE, run_name="bf16")
    state = bf16.load_state_dict()
    assert all(v.dtype == torch.float32 for v in state.values())  # autocast: weights and optimizer stay fp32
    fp32_losses = torch.tensor([r["loss/total"] for r in reference.history])
    bf16_losses = torch.tensor([r["loss/total"] for r in bf16.history])
    assert not torch.equal(bf16_losses, fp32_losses)  # bf16 matmuls really ran
    torch.testing.assert_close(bf16_losses, fp32_losses, rtol=5e-2, atol=1e-2)


@pytest.mark.timeout(300)
def test_checkpoint_on_an_epoch_end_is_taken_after_validation_so_a_resume_does_not_validate_twice(tmp_path):
    # Steps 1-4: stage "head" (epoch 1); 5-8 and 9-12: stage "body" (epochs 2 and 3). The checkpoint due at step 8
    # closes epoch 2; the fault after step 10 resumes from it.
    validated: list[tuple[str, int]] = []

    def validate(stage, epochs_done, state, metrics):
        validated.append((stage, epochs_done))
        return {"head_norm": float(state["head.weight"].norm())}

    reference_cfg = _config("ddp", tmp_path / "reference", checkpoint_every_steps=4)
    reference = fit(reference_cfg, build_tiny_task, SOURCE, run_name="reference", on_epoch_end=validate)
    assert validated == [("head", 1), ("body", 2), ("body", 3)]
    validated.clear()
    cfg = _config("ddp", tmp_path / "killed", checkpoint_every_steps=4, fail_at_step=10)
    with pytest.raises(InjectedFault):
        fit(cfg, build_tiny_task, SOURCE, run_name="killed", on_epoch_end=validate)
    assert validated == [("head", 1), ("body", 2)]
    resumed = fit(cfg, build_tiny_task, SOURCE, run_name="killed", on_epoch_end=validate)
    assert validated == [("head", 1), ("body", 2), ("body", 3)]  # epoch 2 is not validated again
    assert _equal(resumed.load_state_dict(), reference.load_state_dict())


def test_each_stage_reads_its_own_batches_when_given_per_stage(tmp_path):
    # Body's source holds half the rows: 2 steps per epoch instead of the 4 of the shared source (see uninterrupted).
    per_stage = {"head": SOURCE, "body": SyntheticBatchSource(num_samples=32, global_batch_size=16, seed=6)}
    result = fit(_config("ddp", tmp_path), build_tiny_task, per_stage, run_name="per-stage")
    assert result.metrics["head/stage_step"] == 4 and result.metrics["body/stage_step"] == 4
    assert result.metrics["global_step"] == 8
    with pytest.raises(ValueError, match=r"no batch source for stage\(s\) \['body'\]"):
        fit(_config("ddp", tmp_path), build_tiny_task, {"head": SOURCE}, run_name="missing")
