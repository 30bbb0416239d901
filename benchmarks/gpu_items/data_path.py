"""Item ``data_path``: CG-CLIP's training data path on one GPU machine: shards -> decode -> corrupt (CPU tasks) ->
VGG-16 ground-truth map (actors sharing the GPU), in rows/s, against what the trainer consumes.

The same :class:`robustfm.data.ShardBatchSource` the recipe trains from is read three times, each time one stage
longer (decode; decode + corrupt; decode + corrupt + GT map), so the stage where the rate falls is the limiting one.
Each rate counts from the first batch to the last (the actors' start-up is left out: it happens once per run). The
GT-map actors run a random-init VGG-16 (same cost as ImageNet weights, which cannot be downloaded there).

Need: a CG-CLIP batch of N rows puts 2N images (clean + corrupted) through the image tower, so the trainer consumes
rows at half its img/s. The trainer's img/s is the ``engine`` item's ddp rate of this run (ViT-B/32, batch 256,
bf16), filled in by ``gpu_acceptance.py`` when that item ran: ratio = rows/s / (trainer img/s / 2), goal >= 1.0.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from gpu_items.common import ItemReport, Profile, fmt_rate, init_ray, progress

STAGES = ("decode", "corrupt", "gt_map")


def build_shards(workdir: Path, profile: Profile) -> str:
    """The demo data set (scikit-image photos + generated shapes) at the profile's size, through the prepare path."""
    from robustfm.data.demo import write_demo_shards

    images, val = profile.pick(768, 48), profile.pick(96, 8)  # ~25 s of image generation on the GPU machine
    return str(write_demo_shards(workdir / "demo", image_size=profile.image_size, n_images=images, n_val=val))


def source(shards: str, profile: Profile, stages: int) -> Any:
    from robustfm.data import ShardBatchSource
    from robustfm.data.corruption_stages import corrupt_stage, gt_map_stage

    chain = [
        corrupt_stage("seen", run_seed=0, batch_size=profile.pick(64, 8)),
        gt_map_stage(
            "vgg16_l1",
            weights=None,
            min_actors=profile.pick(2, 1),
            max_actors=profile.pick(4, 1),
            num_gpus=profile.pick(0.25, 0.0),
            batch_size=profile.pick(64, 8),
            num_cpus=profile.pick(1.0, 0.5),
        ),
    ][: stages - 1]
    return ShardBatchSource(shards, "train", profile.image_size, profile.pick(64, 8), train=True, stages=chain)


def rows_per_s(batch_source: Any) -> dict[str, float]:
    """Rows/s from the first batch to the last, and the seconds until the first batch."""
    started = time.perf_counter()
    first, rows, counted = None, 0, 0
    for batch in batch_source.batches(0, 0, 1, 0):
        now = time.perf_counter()
        size = len(batch["id"])
        if first is None:
            first = now
        else:
            counted += size
        rows += size
    return {"rows_per_s": counted / (time.perf_counter() - first), "first_batch_s": first - started, "rows": rows}


def data_path(profile: Profile, workdir: Path) -> ItemReport:
    init_ray(profile)
    started = time.perf_counter()
    shards = build_shards(workdir.parent / "shared", profile)  # the cgclip item trains on the same shards
    build_s = time.perf_counter() - started
    progress(f"demo shards ready in {build_s:.0f} s")
    measured = {}
    for index, name in enumerate(STAGES):
        measured[name] = rows_per_s(source(shards, profile, index + 1))
        progress(f"pipeline up to {name}: {measured[name]}")
    table = [
        {
            "pipeline up to": name,
            "rows/s": fmt_rate(m["rows_per_s"]),
            "first batch after": f"{m['first_batch_s']:.1f} s",
        }
        for name, m in measured.items()
    ]
    rates = {name: fmt_rate(m["rows_per_s"]) for name, m in measured.items()}
    return ItemReport(
        summary=f"{os.cpu_count()} CPUs + GT-map actors on the {profile.device}: {rates['gt_map']} rows/s "
        f"(decode {rates['decode']}, + corrupt {rates['corrupt']})",
        metrics={
            "rows_per_s": {name: m["rows_per_s"] for name, m in measured.items()},
            "first_batch_s": {name: m["first_batch_s"] for name, m in measured.items()},
            "rows": measured["gt_map"]["rows"],
            "image_size": profile.image_size,
            "shard_build_s": build_s,
        },
        goal="rows/s >= trainer img/s / 2 (ratio >= 1.0), or the limiting stage named",
        tables={"cumulative pipelines": table},
    )


def compare_with_trainer(report: dict[str, Any], trainer_img_s: float | None) -> None:
    """Fill in the ratio to the trainer (the ``engine`` item's ddp img/s) and name the limiting stage (in place)."""
    if trainer_img_s is None or report.get("status") != "ok" or "ratio" in report["metrics"]:
        return
    rates = report["metrics"]["rows_per_s"]
    need = trainer_img_s / 2
    ratio = rates["gt_map"] / need
    limiting = next((name for name in STAGES if rates[name] < need), None)
    report["metrics"].update({"trainer_img_s": trainer_img_s, "rows_needed_per_s": need, "ratio": ratio})
    report["metrics"]["limiting_stage"] = limiting
    report["summary"] += f"; vs trainer {ratio:.2f}x" + (f", limited by {limiting}" if limiting else "")
    report["goal_met"] = ratio >= 1.0 if report.get("profile") == "gpu" else None
