"""The ground-truth-map stage on CPU against a bare VGG-16 mapper on the same images, measured side by side.

    python benchmarks/gt_map_path.py [--images 256] [--image-size 64] [--batch-size 16] [--repeats 5]

The demo set's training images are decoded and corrupted once, in this process; both sides map the same
(clean, corrupted) pairs with a random-init VGG-16 (``vgg16_l1``, every layer; no weights offline):

- bare: the mapper called in this process on batches of ``--batch-size``, one thread: the arithmetic's cost;
- stage: :func:`robustfm.data.corruption_stages.gt_map_stage` over the same rows as a Ray Data dataset, on a local
  Ray with 2 CPUs and one 1-CPU actor (the demo config's pool), read back by the driver. Its rate is measured in
  steady state (from the first mapped batch to the last; the actor's start-up is printed apart).

The sides alternate over ``--repeats`` rounds; the median (min-max) of each round's ratio bare/stage is printed and
decides: PASS when the stage costs at most 2x the bare mapper per image.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

GOAL = 2.0


def decoded_pairs(shards: Path, image_size: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` training images (eval transform) and their corrupted copies, as float32 arrays."""
    import pyarrow.parquet as pq
    import torch

    from robustfm.corruptions import corrupt_batch
    from robustfm.data.reading import DEFAULT_CROP_SCALE, transform_image

    tables = [pq.read_table(p, columns=["id", "image"]) for p in sorted((shards / "train").glob("*.parquet"))]
    ids = [i for t in tables for i in t.column("id").to_pylist()]
    images = [b for t in tables for b in t.column("image").to_pylist()]
    rows = list(zip(ids, images, strict=True))
    rows = [rows[k % len(rows)] for k in range(count)]
    clean = np.stack([transform_image(b, str(i), image_size, False, 0, 0, DEFAULT_CROP_SCALE) for i, b in rows])
    names = ["gaussian_noise", "motion_blur", "pixelate", "brightness"]
    picks = [names[k % len(names)] for k in range(count)]
    corrupted = corrupt_batch(torch.from_numpy(clean), picks, [3] * count, list(range(count))).numpy()
    return clean.astype(np.float32), corrupted.astype(np.float32)


def bare_rate(clean: np.ndarray, corrupted: np.ndarray, batch_size: int) -> float:
    """Pairs/s of the mapper in this process, one thread."""
    import torch

    from robustfm.gtmaps import build_gt_mapper

    torch.set_num_threads(1)
    mapper = build_gt_mapper("vgg16_l1", scale=1.0)
    with torch.inference_mode():
        mapper(torch.from_numpy(clean[:batch_size]), torch.from_numpy(corrupted[:batch_size]))  # warm-up
        start = time.process_time()
        for first in range(0, len(clean), batch_size):
            chunk = slice(first, first + batch_size)
            mapper(torch.from_numpy(clean[chunk]), torch.from_numpy(corrupted[chunk]))
        return len(clean) / (time.process_time() - start)


def stage_rates(clean: np.ndarray, corrupted: np.ndarray, batch_size: int) -> tuple[float, float]:
    """(steady-state pairs/s, seconds to the first mapped batch) of the GT-map stage with one 1-CPU actor."""
    import ray
    import ray.data

    from robustfm.data.corruption_stages import gt_map_stage

    rows = [{"id": str(k), "image": clean[k], "corrupted": corrupted[k]} for k in range(len(clean))]
    dataset = ray.data.from_items(rows).repartition(max(1, len(rows) // batch_size)).materialize()
    stage = gt_map_stage("vgg16_l1", scale=1.0, max_actors=1, num_cpus=1.0, batch_size=batch_size)
    start = time.perf_counter()
    arrivals = []
    for batch in stage(dataset, 0).iter_batches(batch_size=None, batch_format="numpy"):
        arrivals.append((time.perf_counter(), len(batch["id"])))
    first_at = arrivals[0][0]
    later = sum(n for _, n in arrivals[1:])
    return later / (arrivals[-1][0] - first_at), first_at - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray

    from robustfm.data.demo import write_demo_shards

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            shards = write_demo_shards(Path(tmp), image_size=args.image_size, n_images=96, seed=0)
            clean, corrupted = decoded_pairs(shards, args.image_size, args.images)
        bare, stage, startup = [], [], []
        for _ in range(args.repeats):  # alternating: a burst of load elsewhere hits both sides alike
            bare.append(bare_rate(clean, corrupted, args.batch_size))
            rate, first = stage_rates(clean, corrupted, args.batch_size)
            stage.append(rate)
            startup.append(first)
    finally:
        ray.shutdown()
    ratios = [b / s for b, s in zip(bare, stage, strict=True)]
    median = statistics.median(ratios)
    print(
        f"gt_map_path: {args.images} pairs at {args.image_size} px, batch {args.batch_size}, random-init VGG-16 "
        f"(vgg16_l1, 5 layers); {os.cpu_count()} cores; median (min-max) of {args.repeats} alternating repeats"
    )
    print(f"  bare mapper, 1 thread (CPU time):   {statistics.median(bare):8.1f} pairs/s")
    print(f"  GT-map stage, 1 actor of 1 CPU:     {statistics.median(stage):8.1f} pairs/s (steady state)")
    print(f"  stage start-up to the first batch:  {statistics.median(startup):8.1f} s")
    verdict = "PASS" if median <= GOAL else "FAIL"
    print(
        f"{verdict}  stage cost per pair / bare mapper's: {median:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x), "
        f"goal <= {GOAL}x"
    )


if __name__ == "__main__":
    main()
