"""Items ``engine`` and ``compile``: the CLIP contrastive step through the engine against a bare PyTorch loop, and a
``torch.compile`` variant of the bare loop, with model FLOP/s utilisation.

``engine``: bare loop, engine ``ddp``, bare loop, engine ``deepspeed`` ZeRO-2, bare loop, all in one process's run
(the engine through the Ray launcher, 1 worker, NCCL on the GPU), bf16 autocast. Each side's throughput is the median
of its windows after the first (warm-up); the bare reference is the median of its three runs, and their min/max show
the run-to-run spread. Goal: engine ``ddp`` >= 1.0x bare, read as "not slower than the slowest bare run".
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from gpu_items.clip_task import SyntheticClipSource, bare_windows, clip_task_factory, stage_config
from gpu_items.common import (
    ItemReport,
    Profile,
    device_name,
    fmt_rate,
    init_ray,
    measured_matmul_peak,
    median_min_max,
    nominal_peak,
    progress,
)

MFU_GOAL = 0.35


def _sizes(profile: Profile) -> tuple[int, int, int]:
    """(batch, steps, window): 256 pairs, 4 windows of 10 on the GPU; 8 pairs, 3 windows of 2 in the dry run."""
    return profile.pick(256, 8), profile.pick(40, 6), profile.pick(10, 2)


def engine_run(profile: Profile, strategy: str, source: SyntheticClipSource, window: int, storage: Path) -> dict:
    """One ``fit`` of the contrastive stage with ``strategy``: windows' samples/s after the first, and wall time."""
    from robustfm.config import load_config
    from robustfm.train import TrainConfig, fit

    cfg = load_config(
        TrainConfig,
        base={
            "launcher": "ray",
            "num_workers": 1,
            "use_gpu": profile.gpu,
            "resources_per_worker": profile.pick({"CPU": 8, "GPU": 1}, {"CPU": 1}),
            "storage_path": str(storage),
            "log_every_steps": window,
            "keep_checkpoints": 1,
            "strategy": {"name": strategy, "zero_stage": 2, "precision": "bf16"},
            "stages": {"bench": stage_config(source.steps)},
        },
    )
    started = time.perf_counter()
    result = fit(cfg, clip_task_factory(profile.model), source, run_name=f"engine-{strategy}")
    rates = [r["samples_per_s"] for r in result.history if "samples_per_s" in r][1:]
    wall = time.perf_counter() - started
    progress(f"engine {strategy}: {[round(r) for r in rates]} img/s per window, fit took {wall:.0f} s")
    return {"samples_per_s": rates, "wall_s": wall}


def _mfu(rate: float, flops_per_sample: float | None, peak: float | None) -> float | None:
    if flops_per_sample is None or not peak:
        return None
    return rate * flops_per_sample / peak


def _peaks(profile: Profile) -> dict[str, Any]:
    measured = measured_matmul_peak(profile.device)
    nominal = nominal_peak(profile.device)
    return {
        "device": device_name(profile.device),
        "nominal_bf16_peak_flops": nominal,
        "measured_bf16_matmul_flops": measured,
        "mfu_peak_used": "nominal" if nominal else "measured matmul (no nominal peak known for this device)",
    }


def engine(profile: Profile, workdir: Path) -> ItemReport:
    batch, steps, window = _sizes(profile)
    source = SyntheticClipSource(batch, steps, profile.image_size)
    peaks = _peaks(profile)
    peak = peaks["nominal_bf16_peak_flops"] or peaks["measured_bf16_matmul_flops"]
    init_ray(profile)
    bare_runs, engines, flops = [], {}, None
    for index, strategy in enumerate(("ddp", "deepspeed", None)):
        bare = bare_windows(profile.model, source, profile.device, window, count_flops=index == 0)
        progress(f"bare loop {index + 1}/3: {[round(r) for r in bare['samples_per_s']]} img/s per window")
        flops = flops or bare["flops_per_sample"]
        bare_runs.append(statistics.median(bare["samples_per_s"]))
        if strategy is not None:
            engines[strategy] = engine_run(profile, strategy, source, window, workdir / "runs")
    reference = median_min_max(bare_runs)
    rows = [_row("bare PyTorch loop (median of 3 runs)", reference["median"], reference, flops, peak, peaks)]
    metrics: dict[str, Any] = {"bare": {**reference, "runs": bare_runs}, "flops_per_sample": flops, **peaks}
    for strategy, run in engines.items():
        rate = statistics.median(run["samples_per_s"])
        label = {"ddp": "engine ddp (Ray, 1 worker)", "deepspeed": "engine deepspeed ZeRO-2 (Ray, 1 worker)"}[strategy]
        rows.append(_row(label, rate, reference, flops, peak, peaks))
        metrics[strategy] = {
            "samples_per_s": rate,
            "windows": run["samples_per_s"],
            "ratio_to_bare": rate / reference["median"],
            "mfu": _mfu(rate, flops, peak),
            "fit_wall_s": run["wall_s"],
        }
    ddp = metrics["ddp"]
    met = ddp["samples_per_s"] >= reference["min"]
    summary = (
        f"{profile.model} batch {batch} bf16: bare {fmt_rate(reference['median'])} img/s, "
        f"ddp {ddp['ratio_to_bare']:.2f}x, deepspeed ZeRO-2 {metrics['deepspeed']['ratio_to_bare']:.2f}x"
        + (f", bare MFU {_mfu(reference['median'], flops, peak):.1%}" if flops else "")
    )
    return ItemReport(
        summary=summary,
        metrics=metrics,
        goal="engine ddp >= 1.0x bare (not slower than the slowest of the 3 bare runs)",
        goal_met=met if profile.gpu else None,
        tables={"throughput": rows},
        notes=[
            f"MFU against the {peaks['mfu_peak_used']} peak; FLOPs per image counted by torch.utils.flop_counter "
            "on one eager step (forward + backward of both towers).",
            "DeepSpeed ZeRO-2 was measured at 0.54-0.70x bare on an H100 (shared/METHODS.md): no goal.",
        ],
    )


def _row(label: str, rate: float, reference: dict, flops: float | None, peak: float, peaks: dict) -> dict[str, Any]:
    measured = peaks["measured_bf16_matmul_flops"]
    return {
        "loop": label,
        "img/s": fmt_rate(rate),
        "vs bare": f"{rate / reference['median']:.2f}x",
        "MFU": "-" if flops is None else f"{_mfu(rate, flops, peak):.1%}",
        "of measured matmul": "-" if flops is None else f"{rate * flops / measured:.1%}",
    }


def compile_item(profile: Profile, workdir: Path) -> ItemReport:
    batch, steps, window = _sizes(profile)
    source = SyntheticClipSource(batch, steps, profile.image_size)
    peaks = _peaks(profile)
    peak = peaks["nominal_bf16_peak_flops"] or peaks["measured_bf16_matmul_flops"]
    eager = bare_windows(profile.model, source, profile.device, window, count_flops=True)
    progress(f"eager: {[round(r) for r in eager['samples_per_s']]} img/s per window")
    # The dry run checks the compile path (Dynamo + AOTAutograd) without Inductor's C++ builds, which take minutes
    # on two cores.
    backend = profile.pick("inductor", "aot_eager")
    compiled = bare_windows(profile.model, source, profile.device, window, compile_backend=backend)
    progress(f"compiled: {[round(r) for r in compiled['samples_per_s']]} img/s per window")
    flops = eager["flops_per_sample"]
    eager_rate, compiled_rate = statistics.median(eager["samples_per_s"]), statistics.median(compiled["samples_per_s"])
    mfu = _mfu(compiled_rate, flops, peak)
    rows = [
        _row("bare eager", eager_rate, {"median": eager_rate}, flops, peak, peaks),
        _row(f"bare torch.compile ({backend})", compiled_rate, {"median": eager_rate}, flops, peak, peaks),
    ]
    return ItemReport(
        summary=(
            f"torch.compile ({backend}) {fmt_rate(compiled_rate)} img/s = {compiled_rate / eager_rate:.2f}x eager, "
            f"MFU {mfu:.1%} (eager {_mfu(eager_rate, flops, peak):.1%}); first window with compilation "
            f"{compiled['first_window_s']:.0f} s"
        ),
        metrics={
            "eager_samples_per_s": eager_rate,
            "compiled_samples_per_s": compiled_rate,
            "ratio_to_eager": compiled_rate / eager_rate,
            "mfu": mfu,
            "eager_mfu": _mfu(eager_rate, flops, peak),
            "compile_backend": backend,
            "first_window_s": compiled["first_window_s"],
            "flops_per_sample": flops,
            **peaks,
        },
        goal=f"compiled MFU >= {MFU_GOAL:.0%} of the {peaks['mfu_peak_used']} bf16 peak",
        goal_met=(mfu is not None and mfu >= MFU_GOAL) if profile.gpu else None,
        tables={"throughput": rows},
    )
