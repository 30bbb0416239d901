"""What every item of the GPU acceptance check shares: the profile (GPU sizes or tiny CPU sizes), the item's result,
timing helpers, the device's peak and the Ray every item joins.

Items run in their own subprocess (``python -m gpu_items.run_item``), so nothing here keeps state between items; they
share one Ray, started by ``gpu_acceptance.py`` (a Ray start costs ~5 s of the GPU window per item, and ~10 CPU-s each
in the dry run that CI runs).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

# NVIDIA's dense bf16 tensor-core peak of the SXM H100/H200 (989.4 TFLOP/s; 1979 is with 2:4 sparsity). The H200 has
# the H100's compute with more and faster memory, so both share it. Model FLOP/s utilisation (MFU) is reported
# against this nominal peak, and also against a bf16 matmul measured in the same run (what the chip really gives).
NOMINAL_BF16_PEAK = {"H200": 989.4e12, "H100": 989.4e12}


@dataclass(frozen=True)
class Profile:
    """Sizes of one run: ``gpu`` (the acceptance check on one CUDA device) or ``dry`` (every item on CPU with a tiny
    model, so that the script runs in CI between GPU windows)."""

    name: str
    """``gpu`` or ``dry``."""

    def __post_init__(self) -> None:
        if self.name not in ("gpu", "dry"):
            raise ValueError(f"profile must be 'gpu' or 'dry', got {self.name!r}")

    @property
    def gpu(self) -> bool:
        return self.name == "gpu"

    @property
    def device(self) -> str:
        return "cuda" if self.gpu else "cpu"

    @property
    def model(self) -> str:
        """The CLIP every training item uses: ViT-B/32 at 224 px on the GPU, the tiny registered one (64 px) on CPU."""
        return self.pick("open_clip/ViT-B-32", "open_clip/tiny-vit")

    @property
    def image_size(self) -> int:
        return self.pick(224, 64)

    def pick(self, gpu: T, dry: T) -> T:
        """``gpu`` in the GPU profile, ``dry`` in the dry run."""
        return gpu if self.gpu else dry


@dataclass
class ItemReport:
    """What an item hands back: its numbers, a one-line summary, its goal and whether it was met.

    ``goal_met`` is None when the item has no pass/fail goal in this profile (every goal is about a GPU: the dry run
    only checks that the item runs).
    """

    summary: str
    metrics: dict[str, Any] = field(default_factory=dict)
    goal: str = ""
    goal_met: bool | None = None
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """The item's own markdown tables: title -> rows (one dict per row, the same keys in every row)."""
    notes: list[str] = field(default_factory=list)


def median_min_max(values: Sequence[float]) -> dict[str, float]:
    """``{"median", "min", "max", "n"}`` of ``values`` (the median decides; min/max show the spread)."""
    return {
        "median": float(statistics.median(values)),
        "min": float(min(values)),
        "max": float(max(values)),
        "n": len(values),
    }


def synchronize(device: str) -> None:
    """Wait for the device's queued work (timers must not stop before the GPU has finished)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_rate(fn: Callable[[], Any], items: int, device: str, min_seconds: float, min_calls: int = 3) -> float:
    """Items per second of ``fn`` (one warm-up call, then calls until ``min_seconds`` and ``min_calls``)."""
    fn()
    synchronize(device)
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        if calls >= min_calls:
            synchronize(device)
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                return calls * items / elapsed


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    import platform

    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def nominal_peak(device: str) -> float | None:
    """The nominal dense bf16 FLOP/s of a known GPU (None: unknown, e.g. a CPU)."""
    name = device_name(device)
    return next((peak for key, peak in NOMINAL_BF16_PEAK.items() if key in name), None)


def measured_matmul_peak(device: str) -> float:
    """bf16 FLOP/s of a large square matmul on ``device`` (8192 on a GPU, 512 on a CPU): the practical ceiling."""
    import torch

    n = 8192 if device.startswith("cuda") else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    rate = time_rate(lambda: a @ b, 1, device, min_seconds=1.0 if device.startswith("cuda") else 0.3)
    return 2.0 * n**3 * rate


def start_ray(profile: Profile) -> None:
    """A new embedded Ray on 127.0.0.1: all cores (and the GPU) on the GPU machine, 2 CPUs in the dry run. No
    dashboard: its dependencies are not in the offline bundle. ``gpu_acceptance.py`` starts one for all the items
    (each joins it through ``$RAY_ADDRESS``); an item run on its own starts its own (:func:`init_ray`)."""
    from robustfm.runtime import own_state_api_address, start_local_ray

    own_state_api_address(include_dashboard=False)  # Ray Train's cleaner must not ask another Ray on this host
    start_local_ray(
        num_cpus=os.cpu_count() if profile.gpu else 2,
        num_gpus=1 if profile.gpu else 0,
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=False,
        _node_ip_address="127.0.0.1",
    )


def init_ray(profile: Profile) -> Any:
    """This item's connection to Ray: the check's shared Ray (``$RAY_ADDRESS``, set by ``gpu_acceptance.py``), else
    a Ray of its own (:func:`start_ray`). The workers' output comes to this process, so it lands in the item's log
    (the only trace a failure on the GPU machine leaves)."""
    import ray
    import ray.data

    started = time.perf_counter()
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
        progress(f"joined the check's Ray at {address} in {time.perf_counter() - started:.1f} s")
    else:
        start_ray(profile)
        progress(f"Ray started in {time.perf_counter() - started:.1f} s")
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


def progress(message: str) -> None:
    """A timestamped line in the item's log."""
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def fmt_rate(value: float | None) -> str:
    """``12,345`` (or ``-`` when not measured)."""
    return "-" if value is None else f"{value:,.0f}"
