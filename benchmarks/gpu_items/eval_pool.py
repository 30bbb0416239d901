"""Item ``eval_pool``: an evaluation suite scored by an actor pool whose actors share the GPU (fractional GPUs), in
images/s.

The suite is ``corruption_detection`` (CG-CLIP's metric: every image embedded clean and under each of the nine seen
corruptions) on generated images at 224 px with ViT-B/32, scored by 4 actors of 0.25 GPU each. Throughput is measured
inside the actors (first batch start to last batch end; model construction excluded), as ``benchmarks/eval_scaling.py``
does; the suite's wall time, start-up included, is reported beside it.
"""

from __future__ import annotations

import time
from pathlib import Path

from gpu_items.common import ItemReport, Profile, fmt_rate, init_ray


def eval_pool(profile: Profile, workdir: Path) -> ItemReport:
    from eval_scaling import measure

    from robustfm.config import replace_path
    from robustfm.corruptions import CORRUPTION_SETS
    from robustfm.evals.config import EvalConfig

    actors, gpus = profile.pick(4, 1), profile.pick(0.25, 0.0)
    samples = profile.pick(512, 16)
    init_ray(profile)
    cfg = EvalConfig(seed=0, output_dir=str(workdir / "eval"))
    for path, value in {
        "suites.corruption_detection.data.synthetic_samples": samples,
        "suites.corruption_detection.data.synthetic_image_size": profile.image_size,
        "suites.corruption_detection.corruptions": list(CORRUPTION_SETS["seen"]),
        "pool.min_actors": actors, "pool.max_actors": actors, "pool.num_gpus": gpus,
        "pool.num_cpus": profile.pick(2.0, 0.5), "pool.threads": profile.pick(2, 1),
        "pool.batch_size": profile.pick(64, 8),
    }.items():  # fmt: skip
        cfg = replace_path(cfg, path, value)
    started = time.perf_counter()
    images_s, used, cores, per_cpu_s = measure("corruption_detection", profile.model, cfg)
    wall = time.perf_counter() - started
    return ItemReport(
        summary=(
            f"corruption_detection, {profile.model}, {actors} actors x {gpus:g} GPU: {fmt_rate(images_s)} img/s "
            f"({used} actors scored; {samples} images x 10 versions in {wall:.0f} s with start-up)"
        ),
        metrics={
            "images_per_s": images_s,
            "embeddings_per_s": images_s * (1 + len(CORRUPTION_SETS["seen"])),
            "actors": actors,
            "actors_used": used,
            "gpus_per_actor": gpus,
            "cores_used_by_pool": cores,
            "images": samples,
            "wall_s_with_startup": wall,
        },
    )
