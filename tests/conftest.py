"""Session-wide fixtures. Ray starts once per test session, on loopback, and is stopped at the end."""

from __future__ import annotations

import os

import pytest

from robustfm.runtime import EMBEDDED_HEALTH_CHECK_INTERVAL_S

# Tests never reach a model hub or a cloud: fail fast instead of waiting on network timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/robustfm/torch_extensions"))
# The suite keeps more torch threads busy than the machine has cores (two pytest workers, their subprocesses, Ray's
# workers). OpenMP's idle threads spin by default, burning the cores the others wait for: measured on 2 cores, five
# torch-heavy test files took 271 CPU-seconds (143 s) spinning and 141 (77 s) sleeping. Read when torch loads its
# OpenMP runtime, so it is set here, before any test imports torch; subprocesses and Ray inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The embedded Ray's Ray Train poll interval (robustfm.runtime) for every Ray a test starts, also the simulated
# clusters and the `ray start` head, so that no run waits 2 s for each poll.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(EMBEDDED_HEALTH_CHECK_INTERVAL_S))


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs on 127.0.0.1, shared by every test that asks for it, started as the jobs start theirs.

    With its dashboard: Ray Train's placement-group cleaner asks the State API whether a run's controller is alive
    and removes the workers' placement group once it is not (a Tune trial that ended or was stopped). Without a State
    API those groups stay reserved, and after a sweep or two the data pipelines of later tests wait forever for CPUs.
    """
    import ray

    from robustfm.config.schema import RayConfig
    from robustfm.runtime import init_ray

    init_ray(RayConfig(num_cpus=2), log_to_driver=False)
    yield ray
    ray.shutdown()


# Actors a finished trainer, evaluation or data pipeline must not leave behind. Ray Train keeps one controller
# until the next run replaces it; everything else must be gone once the work that made it returned. Not counted:
# Ray Train's PlacementGroupCleaner, a detached zero-CPU actor that exits by itself once it notices its controller is
# gone, which may take Ray longer than this check waits when Tune kills a stopped trial. What the cleaner frees is
# checked instead: every CPU of the session's Ray is free again after each test.
_LEAK_LIMITS = {"TrainController": 1, "MapWorker": 0}


def _lingering_actors() -> dict[str, int]:
    import ray

    found = {name: 0 for name in _LEAK_LIMITS}
    for actor in ray._private.state.actors().values():
        if actor["State"] != "ALIVE":
            continue
        for name in _LEAK_LIMITS:
            if actor["ActorClassName"].startswith(name):
                found[name] += 1
    return found


def _reserved_cpus() -> float:
    import ray

    return ray.cluster_resources().get("CPU", 0.0) - ray.available_resources().get("CPU", 0.0)


def _placement_groups_held() -> list[dict]:
    from ray.util import placement_group_table

    return [pg["bundles"] for pg in placement_group_table().values() if pg["state"] != "REMOVED"]


@pytest.fixture(autouse=True)
def no_leaked_actors(request):
    """After every test that used the session's Ray: no trainer or actor pool outlives its work and no CPU stays
    reserved (they would pile up over the session until a later test's pipeline waits forever for a CPU). Ray tears
    actors and placement groups down asynchronously: allow some seconds."""
    yield
    if "ray_session" not in request.fixturenames:
        return
    import time

    import ray

    if not ray.is_initialized():
        return
    deadline = time.monotonic() + 30
    while True:
        found = _lingering_actors()
        leaked = {name: count for name, count in found.items() if count > _LEAK_LIMITS[name]}
        reserved = _reserved_cpus()
        if (not leaked and reserved < 1e-6) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not leaked, f"actors left alive after the test: {leaked} (allowed: {_LEAK_LIMITS})"
    held = _placement_groups_held() if reserved >= 1e-6 else []
    assert reserved < 1e-6, f"{reserved:g} CPUs still reserved after the test; placement groups held: {held}"
