"""Stopping the servers and heads that tests start in process groups of their own."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_process_group(process: subprocess.Popen, term_grace_s: float = 30, kill_grace_s: float = 15) -> None:
    """SIGTERM the group ``process`` leads (a server and its workers), then SIGKILL it if it lingers: on a busy
    machine a server can take longer than any fixed grace to stop, and a test's teardown must not fail for that."""
    for sig, grace_s in ((signal.SIGTERM, term_grace_s), (signal.SIGKILL, kill_grace_s)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue
