"""Several Ray nodes on one machine, for tests of what a cluster does to a run: a node lost mid-stage or mid-suite.

:class:`SimulatedCluster` starts a head and worker nodes with ``ray.cluster_utils.Cluster`` (one raylet per node, all
on 127.0.0.1, each with its own share of CPUs and its own custom resources, so work can be pinned to a node), joins
it from this process, and removes or adds nodes while work runs. A process holds one Ray at a time: run scenarios in
a process of their own (see ``tests/ray/multinode_scenarios.py``), not beside a test session's Ray.

That process must set ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` before it imports Ray: otherwise Ray rewrites
"127.0.0.1" in the cluster's address to this machine's network IP, where nodes bound to loopback cannot be reached,
and joining waits forever (as on macOS, the setting keeps a cluster on one machine).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

AGENT_PORTS = ("dashboard_agent_listen_port", "metrics_agent_port", "metrics_export_port", "runtime_env_agent_port")


class SimulatedCluster:
    """A head with ``head_cpus`` CPUs; :meth:`add_node` / :meth:`remove_node` while work runs.

    Args:
        temp_dir: Ray's session directory for every node (short: Unix socket paths are limited to 107 bytes).
        head_cpus: CPUs of the head (drivers' helpers, Ray Train's controller and data tasks run there).
    """

    def __init__(self, temp_dir: str | Path, head_cpus: float = 1) -> None:
        from ray._private import ray_constants
        from ray.cluster_utils import Cluster

        if ray_constants.ENABLE_RAY_CLUSTER:
            raise RuntimeError(
                "SimulatedCluster: set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before importing ray (see this module's "
                "docstring); without it the nodes on 127.0.0.1 cannot be joined"
            )

        self.temp_dir = str(temp_dir)
        os.makedirs(self.temp_dir, exist_ok=True)
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={**self._node_args(head_cpus, {}), "include_dashboard": False},
        )
        self.nodes: dict[str, Any] = {}

    def _node_args(self, cpus: float, resources: Mapping[str, float]) -> dict[str, Any]:
        from robustfm.runtime import free_loopback_port

        return {
            "num_cpus": cpus,
            "resources": dict(resources),
            "node_ip_address": "127.0.0.1",
            "temp_dir": self.temp_dir,
            "object_store_memory": 100 * 2**20,
            # Ports of their own: another Ray on this machine (a test session's) may hold the default ones.
            **{port: free_loopback_port() for port in AGENT_PORTS},
        }

    def connect(self) -> None:
        import ray

        quiet = ray.LoggingConfig(log_level="WARNING")
        ray.init(address=self.cluster.address, log_to_driver=False, logging_config=quiet)

    def add_node(self, name: str, cpus: float, resources: Mapping[str, float]) -> str:
        """Start node ``name`` with ``cpus`` CPUs and ``resources``; returns its Ray node id once it is alive."""
        node = self.cluster.add_node(**self._node_args(cpus, resources))
        self.cluster.wait_for_nodes()
        self.nodes[name] = node
        return node.node_id

    def remove_node(self, name: str) -> None:
        """Kill every process of node ``name`` at once (raylet, object store, its workers), as a lost machine."""
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=False)

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    """Poll ``condition`` until it holds; ``TimeoutError`` naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(poll_s)
