"""Starting or joining Ray the same way in every job."""

from __future__ import annotations

import logging
import os
import socket

from robustfm.config.schema import RayConfig

logger = logging.getLogger("robustfm")


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for local process groups and test servers)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_ray(cfg: RayConfig, log_to_driver: bool = True) -> None:
    """Join the cluster (``address``, or ``$RAY_ADDRESS`` as set by ``ray job submit``) or start an embedded Ray;
    nothing when this process already has Ray.

    The embedded Ray binds to 127.0.0.1, and its dashboard (off by default) too. ``log_to_driver=False`` keeps the
    workers' output out of this process's console (jobs that print their own progress).
    """
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        logger.info("joined Ray at %s", address)
        return
    ray.init(
        # "local": always a new embedded Ray; without it, ray.init joins a head that `ray start` left on this host.
        address="local",
        num_cpus=cfg.num_cpus,
        include_dashboard=cfg.include_dashboard,
        dashboard_host="127.0.0.1",
        log_to_driver=log_to_driver,
        _node_ip_address="127.0.0.1",
    )
    logger.info("started an embedded Ray with %s CPUs", cfg.num_cpus or os.cpu_count())
