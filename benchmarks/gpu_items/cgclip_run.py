"""Item ``cgclip``: one short CG-CLIP run of Adapt -> Isolate -> Tune through ``jobs/cgclip.py`` (ViT-B/32, 224 px,
random init, the demo data set), so that the whole recipe has run on CUDA once.

On the GPU: 24 steps per stage of 24 clean + 24 corrupted images, bf16 DDP on half the GPU while the VGG-16
ground-truth-map actors share the other half, milestone evaluations (corruption detection on 64 images, t-SNE) on a
quarter-GPU actor. No tracking server (the offline bundle has no MLflow), no zero-shot suite and no WiSE-FT mixes
(time). The dry run trains 2 steps per stage of the tiny model and skips the milestone evaluations (so its three
stages train in one fit).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gpu_items.common import ItemReport, Profile, init_ray

REPO = Path(__file__).resolve().parents[2]
CURRICULUM = ("adapt", "isolate", "tune")
MILESTONES = ("adapt", "adapt-isolate", "adapt-isolate-tune")


def demo_shards(workdir: Path, profile: Profile) -> str:
    """On the GPU, the demo shards of the ``data_path`` item (768 images, 90% of them trained on: 24 steps of 24 per
    stage; built here when that item did not run); in the dry run "null": the job builds its own small demo set."""
    if not profile.gpu:
        return "null"
    from gpu_items.data_path import build_shards

    ray = init_ray(profile)
    try:
        return build_shards(workdir.parent / "shared", profile)
    finally:
        ray.shutdown()


def overrides(profile: Profile, out: Path, shards: str) -> list[str]:
    steps = profile.pick(24, 2)
    values: dict[str, Any] = {
        "output_dir": str(out),
        "train.storage_path": str(out / "runs"),  # the config's own is relative: a run of the same name there resumes
        "data.shards": shards,
        "tracking.backend": "none",
        "ray.include_dashboard": "false",
        "ray.num_cpus": profile.pick("null", "2"),
        "model.name": profile.model,
        "data.image_size": profile.image_size,
        "export.wise_ft_alphas": "[]",
        **{f"train.stages.{stage}.max_batches_per_epoch": steps for stage in CURRICULUM},
        **{f"train.stages.{stage}.epochs": 1 for stage in CURRICULUM},  # the demo config trains Adapt for 12
    }
    if profile.gpu:
        values.update(
            {
                "method.tap_blocks": "[4, 8, 12]",
                "method.decoder_channels": "[384, 192, 96]",  # the paper's (the demo config scales it to tiny-vit)
                "data.clean_per_batch": 24,
                "data.gt_map.num_gpus": 0.25,
                "data.gt_map.max_actors": 2,
                "data.gt_map.batch_size": 32,
                "train.use_gpu": "true",
                "train.resources_per_worker.CPU": 4,
                "train.resources_per_worker.GPU": 0.5,
                "train.strategy.precision": "bf16",
                "train.log_every_steps": 8,
                "eval.suites": "[corruption_detection]",
                "eval.tsne_samples": 64,
                "eval.settings.pool.num_gpus": 0.25,
                "eval.settings.pool.num_cpus": 2,
                "eval.settings.pool.batch_size": 64,
                "eval.settings.suites.corruption_detection.data.max_samples": 64,
            }
        )
    else:
        values["eval.enabled"] = "false"
    return [f"{key}={value}" for key, value in values.items()]


def cgclip(profile: Profile, workdir: Path) -> ItemReport:
    shards = demo_shards(workdir, profile)
    out = workdir / "cgclip"
    command = [
        sys.executable,
        "jobs/cgclip.py",
        "--config",
        "configs/cgclip/demo.yaml",
        *overrides(profile, out, shards),
    ]
    started = time.perf_counter()
    print("running", " ".join(command), flush=True)
    job = subprocess.run(command, cwd=REPO)  # its output goes to this item's log as it comes
    wall = time.perf_counter() - started
    if job.returncode != 0:
        raise RuntimeError(f"jobs/cgclip.py exited with {job.returncode} (its output is in this item's log)")
    run_dir = out / "cgclip-demo"
    # One file per group of stages trained in one fit (the dry run evaluates no milestone: all three in one group);
    # each holds the last logged window of its stages under "<stage>/...".
    metrics: dict[str, Any] = {}
    for milestone in MILESTONES:
        found = run_dir / "stages" / milestone / "train_metrics.json"
        if found.is_file():
            metrics.update(json.loads(found.read_text()))
    stages, rows = {}, []
    for stage in CURRICULUM:
        stages[stage] = {
            "steps": metrics.get(f"{stage}/stage_step"),
            "samples_per_s": metrics.get(f"{stage}/samples_per_s"),
            "loss": metrics.get(f"{stage}/loss/total"),
            "strategy": metrics.get("strategy"),
        }
        rows.append({"stage": stage, **{k: _short(v) for k, v in stages[stage].items()}})
    milestones = json.loads((run_dir / "milestones.json").read_text())
    auroc = {name: m.get("corruption_detection/zero_shot/all/auroc") for name, m in milestones.items()}
    return ItemReport(
        summary=f"{profile.model}, {profile.image_size} px: adapt, isolate, tune done in {wall:.0f} s; "
        + ", ".join(f"{s} {_short(v['samples_per_s'])} img/s" for s, v in stages.items()),
        metrics={"stages": stages, "milestone_detection_auroc": auroc, "wall_s": wall, "command": command[1:]},
        tables={"stages (last logged window)": rows},
        notes=["Random init everywhere (no weights offline): losses and AUROCs only show that every part ran."],
    )


def _short(value: Any) -> Any:
    return f"{value:.4g}" if isinstance(value, float) else value
