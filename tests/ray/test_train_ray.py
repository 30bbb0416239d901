"""The engine on Ray Train V2 (2 CPU workers of 0.5 CPU each, gloo): one run per strategy, a killed worker resumed
by ``FailureConfig``, and run storage on S3 (moto's server on 127.0.0.1) resumed by a second ``fit``.

Each ``TorchTrainer.fit`` costs ~20 s on 2 cores, so the uninterrupted DDP run is shared: it is the reference of both
resume tests. Tolerance against the 1-process run: losses within 1e-5 relative, weights within 1e-5 absolute.
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from robustfm.config import load_config
from robustfm.train import TrainConfig, fit
from robustfm.train.synthetic import TINY_TWO_STAGES, SyntheticBatchSource, build_tiny_task

pytestmark = pytest.mark.ray
SOURCE = SyntheticBatchSource(num_samples=64, global_batch_size=16, seed=7)


def _config(storage: str, strategy: str = "ddp", launcher: str = "ray", **extra) -> TrainConfig:
    return load_config(
        TrainConfig,
        base={
            "launcher": launcher,
            "num_workers": 2 if launcher == "ray" else 1,
            "resources_per_worker": {"CPU": 0.5},
            "storage_path": storage,
            "log_every_steps": 1,
            "seed": 4,
            "checkpoint_every_steps": 6,
            "optimizer": {"name": "sgd", "momentum": 0.9},
            "strategy": {"name": strategy, "zero_stage": 2},
            "stages": TINY_TWO_STAGES,
            **extra,
        },
    )


def _losses(result) -> np.ndarray:
    return np.array([r["loss/total"] for r in result.history])


def _assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0.0, atol=atol, msg=lambda m, k=key: f"{k}: {m}")


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    return fit(
        _config(str(tmp_path_factory.mktemp("single")), launcher="local"), build_tiny_task, SOURCE, run_name="single"
    )


@pytest.fixture(scope="module")
def ddp_run(ray_session, tmp_path_factory):
    return fit(_config(str(tmp_path_factory.mktemp("ddp"))), build_tiny_task, SOURCE, run_name="ddp")


@pytest.mark.timeout(240)
def test_ddp_on_ray_matches_one_process_and_writes_the_layout(ddp_run, single_process):
    assert ddp_run.metrics["strategy"] == "ddp" and ddp_run.metrics["global_step"] == 12
    np.testing.assert_allclose(_losses(ddp_run), _losses(single_process), rtol=1e-5, atol=1e-6)
    _assert_states_equal(ddp_run.load_state_dict(), single_process.load_state_dict(), atol=1e-5)
    final = Path(ddp_run.checkpoint_path)
    assert final.name == "checkpoint_step_000000012"
    assert {"train_state.json", "model.safetensors"} <= {p.name for p in final.iterdir()}
    # Two kept (keep_checkpoints=2): step 6 was mid-stage, so it holds the optimizer and both ranks' RNG.
    assert sorted(p.name for p in final.parent.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")) == [
        "checkpoint_step_000000006",
        "checkpoint_step_000000012",
    ]
    mid = final.parent / "checkpoint_step_000000006"
    assert sorted(p.name for p in (mid / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    assert (mid / "optimizer.pt").is_file()


@pytest.mark.timeout(300)
def test_deepspeed_zero2_on_ray_matches_one_process(ray_session, single_process, tmp_path):
    result = fit(_config(str(tmp_path), strategy="deepspeed"), build_tiny_task, SOURCE, run_name="zero2")
    assert result.metrics["strategy"] == "deepspeed" and result.metrics["zero_stage"] == 2
    np.testing.assert_allclose(_losses(result), _losses(single_process), rtol=1e-5, atol=1e-6)
    _assert_states_equal(result.load_state_dict(), single_process.load_state_dict(), atol=1e-5)
    shards = sorted(
        p.name
        for p in (Path(result.checkpoint_path).parent / "checkpoint_step_000000006" / "deepspeed" / "state").iterdir()
    )
    assert [s for s in shards if "optim_states" in s] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]


@pytest.mark.timeout(300)
def test_worker_killed_mid_stage_resumes_to_the_uninterrupted_weights(ddp_run, tmp_path):
    # Rank 0 exits after step 7 on any attempt that did not start from a checkpoint; one restart is allowed, so the
    # run can only finish by resuming from step 6 (stage "body", mid-epoch).
    cfg = _config(str(tmp_path), fail_at_step=7, max_failures=1)
    resumed = fit(cfg, build_tiny_task, SOURCE, run_name="killed")
    _assert_states_equal(resumed.load_state_dict(), ddp_run.load_state_dict())
    np.testing.assert_array_equal(_losses(resumed), _losses(ddp_run))


@pytest.fixture
def s3_bucket(monkeypatch):
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="runs")
    yield endpoint, client
    server.stop()


@pytest.mark.timeout(300)
def test_s3_run_storage_is_resumed_by_a_second_fit(ddp_run, s3_bucket):
    import ray.train

    endpoint, client = s3_bucket
    cfg = _config("s3://runs/engine", storage_endpoint_url=endpoint, fail_at_step=7, max_failures=0)
    with pytest.raises(ray.train.TrainingFailedError):
        fit(cfg, build_tiny_task, SOURCE, run_name="on-s3")
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="runs", Prefix="engine/on-s3/")["Contents"]}
    assert "engine/on-s3/checkpoint_step_000000006/train_state.json" in keys
    assert not any("checkpoint_step_000000012" in k for k in keys)
    # Both ranks marked their part of the step-6 checkpoint written. Ray Train registers a checkpoint only when its
    # controller next polls the workers; forget what it registered, as a run that died within that interval would:
    # the second fit must still resume from step 6 (fail_at_step fires only on a run that starts fresh).
    assert {k for k in keys if "/parts_written/" in k} >= {
        f"engine/on-s3/checkpoint_step_000000006/parts_written/rank_0000{r}" for r in (0, 1)
    }
    client.delete_object(Bucket="runs", Key="engine/on-s3/checkpoint_manager_snapshot.json")
    resumed = fit(cfg, build_tiny_task, SOURCE, run_name="on-s3")
    assert resumed.checkpoint_path == "s3://runs/engine/on-s3/checkpoint_step_000000012"
    _assert_states_equal(resumed.load_state_dict(), ddp_run.load_state_dict())


def test_the_session_ray_answers_state_api_queries_about_its_own_actors(ray_session):
    """Ray Train's placement-group cleaner asks the State API about its controller: it must reach this Ray."""
    from ray.util.state import list_actors

    @ray_session.remote(num_cpus=0)
    class Beacon:
        def ping(self) -> str:
            return "here"

    beacon = Beacon.options(name="state-api-beacon").remote()
    try:
        assert ray_session.get(beacon.ping.remote()) == "here"
        names = {actor.name for actor in list_actors(filters=[("state", "=", "ALIVE")])}
        assert "state-api-beacon" in names
    finally:
        ray_session.kill(beacon)


def test_a_run_on_the_embedded_ray_starts_no_preemption_watcher(ray_session, ddp_run):
    """One machine is never preempted: the embedded Ray runs Ray Train without its preemption-watcher actor."""
    classes = {actor["ActorClassName"] for actor in ray_session._private.state.actors().values()}
    assert any(name.startswith("RayTrainWorker") for name in classes)  # a run did happen on this Ray
    assert not [name for name in classes if "PreemptionWatcher" in name]
