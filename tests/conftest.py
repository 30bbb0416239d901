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
