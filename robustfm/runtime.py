"""Starting or joining Ray, and the console of a job, the same way in every job."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from robustfm.config.schema import RayConfig

logger = logging.getLogger("robustfm")


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for local process groups and test servers)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_ray(cfg: RayConfig, log_to_driver: bool = True, verbose: bool = False) -> None:
    """Join the cluster (``address``, or ``$RAY_ADDRESS`` as set by ``ray job submit``) or start an embedded Ray;
    nothing when this process already has Ray.

    The embedded Ray binds to 127.0.0.1, its dashboard too (``include_dashboard``: it also serves the State API,
    without which Ray Train's placement-group cleaner warns every second). ``log_to_driver=False`` keeps the workers'
    output out of this process's console (jobs that print their own progress). Unless ``verbose``, Ray's libraries
    and third-party code in the workers log at WARNING and above: robustfm's own progress still shows.
    """
    import ray

    if ray.is_initialized():
        return
    logging_config = None if verbose else ray.LoggingConfig(log_level="WARNING")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    with _driver_logging_kept():  # Ray's logging config would replace this process's console set-up
        if address:
            ray.init(address=address, log_to_driver=log_to_driver, logging_config=logging_config)
        else:
            dashboard_port = own_state_api_address(cfg.include_dashboard)
            start_local_ray(
                num_cpus=cfg.num_cpus,
                include_dashboard=cfg.include_dashboard,
                dashboard_host="127.0.0.1",
                **({"dashboard_port": dashboard_port} if dashboard_port else {}),
                log_to_driver=log_to_driver,
                logging_config=logging_config,
                _node_ip_address="127.0.0.1",
            )
    if address:
        logger.info("joined Ray at %s", address)
    else:
        logger.info("started an embedded Ray with %s CPUs", cfg.num_cpus or os.cpu_count())


NODE_START_ATTEMPTS = 3
"""How many times :func:`start_local_ray` starts a local Ray whose node did not come up in time."""
EMBEDDED_HEALTH_CHECK_INTERVAL_S = 0.25
"""Seconds between Ray Train's polls of its workers on an embedded Ray (Ray's default: 2)."""


def start_local_ray(**init_kwargs: Any) -> None:
    """``ray.init(address="local", **init_kwargs)``: always a new embedded Ray (without "local", ``ray.init`` joins a
    head that ``ray start`` left here), tried up to :data:`NODE_START_ATTEMPTS` times.

    Ray gives a new node a fixed 30 s to register with its GCS (``ray/_private/node.py``, not configurable); two cores
    under a heavy load (a CI run with two end-to-end tests side by side) exceeded it. Another attempt starts a fresh
    local Ray; any other error is raised at once.
    """
    import ray

    # One machine cannot be preempted: Ray Train's preemption watcher (an actor process per training run, polling
    # for draining nodes) only costs CPU here. On a cluster it stays on.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Ray Train's controller polls its workers every 2 s, so each run waits up to that long to see its workers start
    # and again to see them finish: a tiny run took 15.7 s with it, 8.6 s with 0.25 s, for the same CPU. With a few
    # workers on one machine the polls cost nothing; a cluster keeps Ray's default.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(EMBEDDED_HEALTH_CHECK_INTERVAL_S))
    for attempt in range(1, NODE_START_ATTEMPTS + 1):
        try:
            ray.init(address="local", **init_kwargs)
            return
        except Exception as err:
            if "timed out during startup" not in str(err) or attempt == NODE_START_ATTEMPTS:
                raise
            logger.warning(
                "the local Ray node did not start in time (attempt %d of %d): again", attempt, NODE_START_ATTEMPTS
            )
            ray.shutdown()


def own_state_api_address(include_dashboard: bool) -> int | None:
    """Point this process, and the Ray it is about to start (the raylet and every worker inherit the environment),
    at that Ray's own State API; returns the dashboard port to start it on (None without a dashboard). Call it right
    before ``ray.init`` starts a new local Ray.

    Ray Train's placement-group cleaner asks the State API whether a run's controller is still alive. Left to find
    "the" cluster itself, it scans the host, and with several Ray instances on one machine (two jobs on a laptop, a
    benchmark beside the tests) it can ask another cluster, hear "no such actor", and remove the placement group of a
    healthy run (seen here: a run killed mid-stage with "Destroying worker since its placement group was removed").
    Without a dashboard there is no State API of our own: the address then names a loopback port nothing listens on
    (port 1 needs root to bind), so the cleaner only fails to connect and never frees another run's group; what it
    would have freed (the workers' group of a Tune trial that ended) stays reserved until that Ray stops.
    """
    if not include_dashboard:
        os.environ["RAY_API_SERVER_ADDRESS"] = "http://127.0.0.1:1"
        return None
    port = free_loopback_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    return port


@contextlib.contextmanager
def _driver_logging_kept() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        if handlers:  # a job configured its console (configure_job_logging): put it back
            for handler in list(root.handlers):
                root.removeHandler(handler)
            for handler in handlers:
                root.addHandler(handler)
            root.setLevel(level)


class _OwnRecords(logging.Filter):
    """The console shows robustfm's own records, and anyone's errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("robustfm") or record.levelno >= logging.ERROR


def configure_job_logging(output_dir: str | Path, verbose: bool = False) -> Path:
    """A quiet console: a job prints its own progress and summary; everything else goes to a log file.

    The console gets ``robustfm`` records at INFO and anyone's errors; ``<output_dir>/logs/job.log`` gets every
    record at INFO, Python warnings (each once per place) and Ray Data's executor lines, which otherwise fill the
    console with hundreds of progress and resource lines. ``verbose`` puts everything on the console too.
    Call it before Ray starts (Ray Data reads its logging config when it is first imported, also in Ray workers,
    which inherit the environment of an embedded Ray). Returns the log file.
    """
    log_dir = Path(output_dir).expanduser().resolve() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / "job.log"
    fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    to_file = logging.FileHandler(log_file)
    to_file.setFormatter(fmt)
    to_console = logging.StreamHandler()
    to_console.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    if not verbose:
        to_console.addFilter(_OwnRecords())
    root.addHandler(to_file)
    root.addHandler(to_console)
    logging.captureWarnings(True)  # warnings become records of "py.warnings": to the file, not the console
    warnings.simplefilter("default")
    if not verbose:
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(_quiet_ray_data_config(log_dir)))
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # mlflow's own console handler ("Creating tables")
    logger.info("logs of this job (Ray, Ray Data, warnings): %s", log_file)
    return log_file


def _quiet_ray_data_config(log_dir: Path) -> Path:
    """Ray Data's own logging config with its console handler raised to ERROR (its file log is unchanged)."""
    import yaml

    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"ray": {"format": "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"}},
        "handlers": {
            "file": {
                "class": "ray.data._internal.logging.SessionFileHandler",
                "formatter": "ray",
                "filename": "ray-data.log",
            },
            "console": {"class": "ray._private.log.PlainRayHandler", "formatter": "ray", "level": "ERROR"},
        },
        "loggers": {"ray.data": {"level": "DEBUG", "handlers": ["file", "console"], "propagate": False}},
    }
    path = log_dir / "ray_data_logging.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
