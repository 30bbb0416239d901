"""Where a new embedded Ray's State API is: its own dashboard, or nowhere, never another Ray on the host."""

from __future__ import annotations

import os
import socket

import pytest

from robustfm.runtime import own_state_api_address


def test_with_a_dashboard_the_address_names_the_port_the_dashboard_gets(monkeypatch):
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265")  # inherited from a parent's Ray
    port = own_state_api_address(include_dashboard=True)
    import os

    assert port is not None and port != 8265
    assert os.environ["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{port}"
    with socket.socket() as sock:  # free right now, so the dashboard can bind it
        sock.bind(("127.0.0.1", port))


def test_without_a_dashboard_the_address_names_a_port_nothing_listens_on(monkeypatch):
    import os

    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265")
    assert own_state_api_address(include_dashboard=False) is None
    address = os.environ["RAY_API_SERVER_ADDRESS"]
    assert address != "http://127.0.0.1:8265"
    host, port = address.removeprefix("http://").split(":")
    with socket.socket() as sock:
        sock.settimeout(2)
        assert sock.connect_ex((host, int(port))) != 0  # refused: the cleaner can never reach another cluster


def test_a_local_node_that_starts_too_slowly_is_started_again(monkeypatch):
    import ray

    from robustfm.runtime import start_local_ray

    calls, shutdowns = [], []

    def slow_then_fine(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise Exception("The current node timed out during startup. This could happen because ...")

    monkeypatch.setattr(ray, "init", slow_then_fine)
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(True))
    start_local_ray(num_cpus=2)
    assert calls == [{"address": "local", "num_cpus": 2}] * 2 and shutdowns == [True]


def test_other_start_errors_and_the_last_timeout_are_raised(monkeypatch):
    import ray

    from robustfm.runtime import NODE_START_ATTEMPTS, start_local_ray

    calls = []

    def failing(message):
        def init(**kwargs):
            calls.append(kwargs)
            raise Exception(message)

        return init

    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "init", failing("port 6379 in use"))
    with pytest.raises(Exception, match="port 6379 in use"):
        start_local_ray()
    assert len(calls) == 1
    monkeypatch.setattr(ray, "init", failing("The current node timed out during startup."))
    with pytest.raises(Exception, match="timed out during startup"):
        start_local_ray()
    assert len(calls) == 1 + NODE_START_ATTEMPTS


def test_an_embedded_ray_polls_its_training_workers_often_unless_told_otherwise(monkeypatch):
    """Ray's processes read the environment of the process that starts them: it must be set before ``ray.init``."""
    import ray

    from robustfm.runtime import EMBEDDED_HEALTH_CHECK_INTERVAL_S, start_local_ray

    seen = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.append(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")))
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    start_local_ray()
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    start_local_ray()
    assert seen == [str(EMBEDDED_HEALTH_CHECK_INTERVAL_S), "3"]
    assert EMBEDDED_HEALTH_CHECK_INTERVAL_S < 2  # Ray's own default: each run would wait up to 2 s per poll
