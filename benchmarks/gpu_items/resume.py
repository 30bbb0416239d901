"""Item ``resume``: a DeepSpeed ZeRO-2 bf16 stage whose worker is killed mid-run and resumed equals the uninterrupted
run.

Run A trains the stage uninterrupted. Run B is the same stage with the engine's ``fail_at_step``: the worker process
exits (``os._exit``) right after that step; Ray Train restarts the worker group (``max_failures: 1``), which resumes
from the last periodic checkpoint (ZeRO-2 optimizer shards, fp32 weights, RNG states, data position) and finishes.
Both runs set PyTorch's deterministic kernels and ``CUBLAS_WORKSPACE_CONFIG`` (the item's environment), so the same
steps from the same state give the same bits.

Tolerance: bf16 autocast rounds activations to 8 significant bits, so any difference in the order of floating-point
operations between two runs shows up as differences far larger than fp32 rounding; a fixed tolerance could neither
be justified nor tell a resume bug from kernel nondeterminism. The check therefore measures the kernels' own
run-to-run noise: when A and B differ at all, run C repeats A uninterrupted, and B passes only if it is no further
from A than C is (times 2, for the randomness of that noise). With deterministic kernels (the expected case) A and
B must agree bit for bit: tolerance 0.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from gpu_items.clip_task import SyntheticClipSource, clip_task_factory, stage_config
from gpu_items.common import ItemReport, Profile, init_ray, progress

NOISE_MARGIN = 2.0


def _run(profile: Profile, storage: Path, name: str, steps: int, batch: int, fail_at: int | None) -> dict[str, Any]:
    from robustfm.config import load_config
    from robustfm.train import TrainConfig, fit

    every = steps // 2  # one periodic checkpoint mid-stage (the next one would be the stage's end)
    cfg = load_config(
        TrainConfig,
        base={
            "launcher": "ray",
            "num_workers": 1,
            "use_gpu": profile.gpu,
            "resources_per_worker": profile.pick({"CPU": 8, "GPU": 1}, {"CPU": 1}),
            "storage_path": str(storage),
            "log_every_steps": 1,
            "checkpoint_every_steps": every,
            "keep_checkpoints": 2,
            "max_failures": 1 if fail_at else 0,
            "fail_at_step": fail_at,
            "seed": 0,
            "strategy": {"name": "deepspeed", "zero_stage": 2, "precision": "bf16"},
            # warmup + cosine: the resumed run must also restore its place in the schedule
            "stages": {"resume": stage_config(steps, lr=1e-4, warmup_steps=2, schedule="cosine")},
        },
    )
    source = SyntheticClipSource(batch, steps, profile.image_size, seed=1)
    pid_log = storage / f"{name}.pids"
    storage.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = fit(cfg, clip_task_factory(profile.model, True, str(pid_log)), source, run_name=name)
    losses = [r["loss/total"] for r in result.history if "loss/total" in r]
    # The task is built once in this process (checks) and in every worker attempt: a kill and a restart leave two.
    workers = len(set(pid_log.read_text().split()) - {str(os.getpid())})
    progress(f"run {name}: {time.perf_counter() - started:.0f} s, {workers} worker process(es)")
    return {
        "state": result.load_state_dict(),
        "losses": losses,
        "wall_s": time.perf_counter() - started,
        "workers": workers,
    }


def _difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Max absolute difference over all tensors, the tensor where it is largest, and how many tensors differ."""
    if set(a) != set(b):
        raise AssertionError(f"the two states hold different tensors: {sorted(set(a) ^ set(b))[:5]}")
    worst, where, differing = 0.0, "", 0
    for key in a:
        diff = (a[key].double() - b[key].double()).abs().max().item() if a[key].numel() else 0.0
        differing += diff > 0
        if diff > worst:
            worst, where = diff, key
    return {"max_abs": worst, "worst_tensor": where, "tensors_differing": differing, "tensors": len(a)}


def resume(profile: Profile, workdir: Path) -> ItemReport:
    steps, batch = profile.pick(8, 6), profile.pick(64, 4)
    fail_at = steps // 2 + 1  # one step after the periodic checkpoint: the resumed run replays it
    # cuBLAS reads this when its first handle is made. The check's environment has it (also its shared Ray's
    # workers); set here for a run of this item on its own Ray, which then inherits it.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    init_ray(profile)
    storage = workdir / "runs"
    a = _run(profile, storage, "uninterrupted", steps, batch, None)
    b = _run(profile, storage, "killed-and-resumed", steps, batch, fail_at)
    ab = _difference(a["state"], b["state"])
    metrics: dict[str, Any] = {
        "model": profile.model,
        "steps": steps,
        "batch": batch,
        "killed_after_step": fail_at,
        "checkpoint_every_steps": steps // 2,
        "resumed_vs_uninterrupted": ab,
        "losses_equal": a["losses"] == b["losses"],
        "worker_processes": {"uninterrupted": a["workers"], "killed_and_resumed": b["workers"]},
        "wall_s": {"uninterrupted": a["wall_s"], "killed_and_resumed": b["wall_s"]},
    }
    if b["workers"] < 2:
        raise RuntimeError(f"the killed run used {b['workers']} worker process(es): the kill did not happen")
    runs = [("uninterrupted", a, None), (f"killed after step {fail_at}, resumed", b, ab)]
    if ab["max_abs"] == 0 and metrics["losses_equal"]:
        passed, tolerance = True, 0.0
        summary = f"bit-identical to the uninterrupted run ({ab['tensors']} tensors, every logged loss equal)"
    else:
        c = _run(profile, storage, "uninterrupted-again", steps, batch, None)
        ac = _difference(a["state"], c["state"])
        runs.append(("uninterrupted again (the kernels' own noise)", c, ac))
        tolerance = NOISE_MARGIN * ac["max_abs"]
        passed = ab["max_abs"] <= tolerance
        metrics["repeat_vs_uninterrupted"] = ac
        summary = (
            f"max |resumed - uninterrupted| {ab['max_abs']:.3g} ({ab['tensors_differing']}/{ab['tensors']} tensors "
            f"differ) vs run-to-run noise {ac['max_abs']:.3g}: {'within' if passed else 'BEYOND'} {NOISE_MARGIN:g}x"
        )
    metrics["tolerance"] = tolerance
    rows = [
        {
            "run": label,
            "worker processes": run["workers"],
            "s": f"{run['wall_s']:.0f}",
            "max abs diff to uninterrupted": "-" if diff is None else f"{diff['max_abs']:.3g}",
            "tensors differing": "-" if diff is None else f"{diff['tensors_differing']}/{diff['tensors']}",
        }
        for label, run, diff in runs
    ]
    return ItemReport(
        tables={"final weights": rows},
        summary=f"ZeRO-2 bf16, killed after step {fail_at}/{steps}: {summary}",
        metrics=metrics,
        goal="resumed == uninterrupted (bitwise; if the kernels themselves are not deterministic: no further apart "
        f"than two uninterrupted runs, x{NOISE_MARGIN:g})",
        goal_met=passed,
    )
