"""What the fidelity benchmarks share: their embedded Ray, the machine line under every table, and the whole
command line of a benchmark that runs one paired recipe per seed on the demo data (FARE, paper 004)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def start_ray() -> None:
    """A private embedded Ray on every CPU, through the jobs' own ``init_ray`` (its dashboard serves the State API
    to its own workers only: Ray Train's cleaner then never asks another Ray on the host about this run)."""
    from robustfm.config import RayConfig
    from robustfm.runtime import init_ray

    init_ray(RayConfig(num_cpus=os.cpu_count() or 2))


def machine_line(started: float) -> str:
    """The host, its CPUs and load, and the wall time since ``started`` (``time.perf_counter()``)."""
    return (
        f"\n{platform.node()}: {os.cpu_count()} CPUs, load average {os.getloadavg()}, "
        f"total {time.perf_counter() - started:.0f} s"
    )


def run_seeded_fidelity(
    description: str,
    default_epochs: int,
    epochs_help: str,
    name: str,
    run_seed: Callable[[int, argparse.Namespace, str], Any],
    report: Callable[[list[Any], list[int]], bool],
    argv: list[str] | None = None,
) -> int:
    """Parse ``--seeds/--epochs/--output-dir``, build the demo shards (96 training, 48 held-out images at 64 px),
    run ``run_seed`` per seed on them, print ``report``'s table and checks; exit status 1 when a check FAILs."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (>= 3 for a CI)")
    parser.add_argument("--epochs", type=int, default=default_epochs, help=epochs_help)
    parser.add_argument("--output-dir", type=Path, default=REPO / "outputs" / name)
    args = parser.parse_args(argv)
    args.output_dir = args.output_dir.resolve()

    from robustfm.data.demo import write_demo_shards
    from robustfm.runtime import configure_job_logging

    started = time.perf_counter()
    configure_job_logging(args.output_dir)
    start_ray()
    shards = str(write_demo_shards(args.output_dir / "demo_data", image_size=64, n_images=96, n_val=48))
    per_seed = [run_seed(seed, args, shards) for seed in args.seeds]
    ok = report(per_seed, args.seeds)
    print(machine_line(started))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit("a library of the fidelity benchmarks; run benchmarks/fidelity_*.py")
