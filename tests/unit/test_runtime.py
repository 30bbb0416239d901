"""Where a new embedded Ray's State API is: its own dashboard, or nowhere, never another Ray on the host."""

from __future__ import annotations

import socket

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
