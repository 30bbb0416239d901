"""Session-wide fixtures. Ray starts once per test session, on loopback, and is stopped at the end."""

from __future__ import annotations

import os

import pytest

# Tests never reach a model hub or a cloud: fail fast instead of waiting on network timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/robustfm/torch_extensions"))


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs on 127.0.0.1, shared by every test that asks for it."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()


# Actors a finished trainer, evaluation or data pipeline must not leave behind. Ray Train keeps one controller
# until the next run replaces it; everything else must be gone once the work that made it returned. Not counted:
# Ray Train's PlacementGroupCleaner, a detached zero-CPU actor that exits by itself once it notices its controller is
# gone, which takes Ray longer than this check waits when Tune kills a stopped trial.
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


@pytest.fixture(autouse=True)
def no_leaked_actors(request):
    """After every test that used the session's Ray: no trainer or actor pool outlives its work (they would
    pile up over the session, holding CPUs and memory). Ray tears actors down asynchronously: allow a few seconds."""
    yield
    if "ray_session" not in request.fixturenames:
        return
    import time

    import ray

    if not ray.is_initialized():
        return
    deadline = time.monotonic() + 20
    while True:
        found = _lingering_actors()
        leaked = {name: count for name, count in found.items() if count > _LEAK_LIMITS[name]}
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not leaked, f"actors left alive after the test: {leaked} (allowed: {_LEAK_LIMITS})"
