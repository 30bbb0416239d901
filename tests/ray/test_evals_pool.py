"""The scoring pool outlives one suite inside a session: the same actor process scores every suite of it (no new
process importing torch per suite), rebuilds its scorer when the model changes, and is gone when the session ends."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

pytestmark = [pytest.mark.ray]


def _cfg(tmp_path, seed: int = 0, shards: str | None = None, pool=None):
    from robustfm.evals.config import ActorPoolConfig, EvalConfig, EvalDataConfig, SuiteSettings
    from robustfm.evals.suites.corruption_detection import CorruptionDetectionConfig
    from robustfm.evals.suites.zero_shot import ZeroShotConfig

    if shards is None:
        data = EvalDataConfig(synthetic_samples=6, synthetic_image_size=32)
    else:
        data = EvalDataConfig(shards=shards, split="val", max_samples=4)
    return EvalConfig(
        output_dir=str(tmp_path / "out"),
        seed=seed,
        pool=pool or ActorPoolConfig(min_actors=1, max_actors=1, num_cpus=0.5, batch_size=3),
        suites=SuiteSettings.build(
            {
                "corruption_detection": CorruptionDetectionConfig(data=data, corruptions=("gaussian_noise",)),
                "zero_shot": ZeroShotConfig(data=data, corruptions=("gaussian_noise",), perturbations=()),
            }
        ),
    )


def _pids(result) -> set[int]:
    return set(np.asarray(result.rows["actor_pid"]).tolist())


def _gone(pid: int, within_s: float = 60.0) -> bool:
    import psutil

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.5)
    return False


@pytest.mark.timeout(600)
def test_one_actor_scores_every_suite_of_a_session_and_stops_with_it(ray_session, tmp_path):
    from robustfm.evals.pool import scoring_session
    from robustfm.evals.runner import run_suite

    cfg, other_seed = _cfg(tmp_path), _cfg(tmp_path / "seed1", seed=1)
    with scoring_session():
        detection = run_suite("corruption_detection", "open_clip/tiny-vit", cfg, keep_rows=True)
        zero_shot = run_suite("zero_shot", "open_clip/tiny-vit", cfg, keep_rows=True)
        # Another seed is another random-init model: the actor must build it, not score with the one it holds.
        reseeded = run_suite("zero_shot", "open_clip/tiny-vit", other_seed, keep_rows=True)
    assert len(_pids(detection)) == 1
    assert _pids(detection) == _pids(zero_shot) == _pids(reseeded)
    (pid,) = _pids(detection)
    assert _gone(pid), "the session's actor outlived the session"

    # Outside a session each suite gets (and stops) an actor of its own; the numbers are the same either way.
    alone = run_suite("zero_shot", "open_clip/tiny-vit", other_seed, keep_rows=True)
    assert _pids(alone) != _pids(reseeded)
    assert alone.metrics == reseeded.metrics
    assert zero_shot.metrics != reseeded.metrics  # the seed made another model, so the shared actor did rebuild it


@pytest.mark.timeout(400)
def test_a_pool_as_large_as_the_cluster_leaves_the_next_suite_room_to_read_its_shards(ray_session, tmp_path):
    """Two actors of 1 CPU on the 2-CPU test Ray: while they stay, no task can read the next suite's shards. The
    session stops them before that suite reads (and restarts them to score it) instead of waiting forever."""
    from robustfm.evals.config import ActorPoolConfig
    from robustfm.evals.pool import scoring_session
    from robustfm.evals.runner import run_suite
    from robustfm.testing.datasets import write_demo_shards

    shards = write_demo_shards(tmp_path / "demo", image_size=32, n_images=8, n_val=4, shard_size=2)
    pool = ActorPoolConfig(min_actors=2, max_actors=2, num_cpus=1, batch_size=2, wait_for_min_actors_s=120)
    cfg = _cfg(tmp_path, shards=str(shards), pool=pool)
    with scoring_session():
        first = run_suite("corruption_detection", "open_clip/tiny-vit", cfg, keep_rows=True)
        second = run_suite("zero_shot", "open_clip/tiny-vit", cfg, keep_rows=True)
    assert first.counts["scored"] == second.counts["scored"] == 4
    assert len(_pids(first)) == len(_pids(second)) == 2
    assert not _pids(first) & _pids(second)  # the first suite's actors were stopped to let the second read


@pytest.mark.timeout(120)
def test_a_pool_the_cluster_cannot_place_fails_naming_what_its_actors_ask_for(ray_session):
    from robustfm.evals.config import ActorPoolConfig
    from robustfm.evals.pool import ScoringPool

    config = ActorPoolConfig(min_actors=1, max_actors=1, num_cpus=0.5, resources={"score_slot": 1})
    pool = ScoringPool(dataclasses.replace(config, wait_for_min_actors_s=3))
    with pytest.raises(TimeoutError, match=r"min_actors=1 .* within eval.pool.wait_for_min_actors_s=3: .*score_slot"):
        pool.score([], None)
    assert not pool.holds_actors()  # the pending actor was stopped, not left waiting for a node
