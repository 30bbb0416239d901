"""Decode + resize throughput of the Ray Data reading path against a plain single-process PIL loop.

    python benchmarks/data_decode.py [--images 384] [--source-size 384] [--image-size 224]

Builds shards from scikit-image photos (random crops, JPEG) and generated images through the normal prepare path,
then decodes the same shards (eval transform: shorter side to ``image-size``, centre crop, float32 CHW) with:

- the reference: a plain PIL loop in this process (open, convert RGB, resize, crop, to float32);
- robustfm's transform in this process (same loop, with reduced-scale JPEG decoding);
- ``decode_images(open_shards(...))`` through Ray Data on a local Ray with 1 CPU, then with 2 CPUs.

Prints images/s and each one's ratio to the reference, all measured in this run: the sides alternate over
``--repeats`` rounds and the median (min-max) of each round's ratio is printed; PASS / FAIL on the medians for Ray
Data per core (1 CPU vs the plain loop, goal >= 0.9x) and its scaling (2 CPUs vs 1, goal >= 1.7x). At the default
1,024 images Ray Data's start-up weighs in; ``--images 12288`` makes each pass take a minute or more.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image


def build_shards(root: Path, n_images: int, source_size: int) -> Path:
    import skimage.data

    from robustfm.data.config import PrepareConfig, SourceConfig
    from robustfm.data.demo_images import PHOTOS, generated_image
    from robustfm.data.prepare import run

    rng = np.random.default_rng(0)
    photos = {name: getattr(skimage.data, name)() for name in PHOTOS}
    for i in range(n_images):
        if i % 2:
            pixels = generated_image(i % 5, (source_size, source_size * 3 // 4), seed=i)
            folder = root / "source" / "generated"
        else:
            name = list(PHOTOS)[i // 2 % len(PHOTOS)]
            photo = photos[name]
            side = int(min(photo.shape[:2]) * rng.uniform(0.7, 1.0))
            top = int(rng.integers(0, photo.shape[0] - side + 1))
            left = int(rng.integers(0, photo.shape[1] - side + 1))
            crop = Image.fromarray(photo[top : top + side, left : left + side])
            pixels = np.asarray(crop.resize((source_size, source_size * 3 // 4), Image.Resampling.BICUBIC))
            folder = root / "source" / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    config = PrepareConfig(
        source=SourceConfig(kind="image_folder", root=str(root / "source")),
        output=str(root / "shards"),
        shard_size=max(8, n_images // 8),
        progress=False,
    )
    run(config)
    return root / "shards"


def plain_pil(data: bytes, size: int) -> np.ndarray:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    return pixels.transpose(2, 0, 1)


def local_rate(images: list[bytes], ids: list[str], size: int, robustfm_transform: bool) -> float:
    """Images/s of one pass of the in-process loop (the plain PIL reference, or robustfm's transform)."""
    from robustfm.data.reading import DEFAULT_CROP_SCALE, transform_image

    start = time.perf_counter()
    for data, sample_id in zip(images, ids, strict=True):
        if robustfm_transform:
            transform_image(data, sample_id, size, False, 0, 0, DEFAULT_CROP_SCALE)
        else:
            plain_pil(data, size)
    return len(images) / (time.perf_counter() - start)


def ray_rate(shards: Path, size: int, num_cpus: int) -> float:
    """Images/s of one pass of ``decode_images(open_shards(...))`` on a fresh local Ray with ``num_cpus`` CPUs
    (Ray's own start-up is not timed; the dataset's start-up is)."""
    import ray

    from robustfm.data.reading import decode_images, open_shards

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        start = time.perf_counter()
        rows = 0
        ds = decode_images(open_shards(str(shards), "train"), size, train=False, seed=0, epoch=0)
        for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
            rows += len(batch["id"])
        return rows / (time.perf_counter() - start)
    finally:
        ray.shutdown()


GOALS = {"Ray Data 1 CPU / plain loop (per core)": 0.9, "Ray Data 2 CPUs / 1 CPU (scaling)": 1.7}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024, help="README's realistic size: --images 12288")
    parser.add_argument("--source-size", type=int, default=384, help="width of the stored JPEGs (height 3/4 of it)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5, help="alternating repeats (>= 5 advised); medians decide")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray

    sides = ("plain PIL loop", "robustfm transform, 1 process", "Ray Data, 1 CPU", "Ray Data, 2 CPUs")
    rates: dict[str, list[float]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        shards = build_shards(Path(tmp), args.images, args.source_size)
        ray.shutdown()
        tables = [pq.read_table(p, columns=["id", "image"]) for p in sorted((shards / "train").glob("*.parquet"))]
        ids = [i for t in tables for i in t.column("id").to_pylist()]
        images = [b for t in tables for b in t.column("image").to_pylist()]
        for _ in range(args.repeats):  # the sides alternate: a burst of load elsewhere hits every side alike
            rates[sides[0]].append(local_rate(images, ids, args.image_size, robustfm_transform=False))
            rates[sides[1]].append(local_rate(images, ids, args.image_size, robustfm_transform=True))
            rates[sides[2]].append(ray_rate(shards, args.image_size, 1))
            rates[sides[3]].append(ray_rate(shards, args.image_size, 2))
    load = os.getloadavg()[0]
    print(
        f"data_decode: {len(images)} JPEGs {args.source_size}x{args.source_size * 3 // 4} -> {args.image_size}px, "
        f"{os.cpu_count()} cores, load average {load:.1f}; median (min-max) of {args.repeats} alternating repeats"
    )
    reference = rates[sides[0]]
    for side in sides:
        ratios = [r / ref for r, ref in zip(rates[side], reference, strict=True)]
        print(
            f"  {side + ':':<31} {statistics.median(rates[side]):8.1f} img/s  {statistics.median(ratios):.2f}x "
            f"({min(ratios):.2f}-{max(ratios):.2f}x) of the plain loop"
        )
    checks = {
        "Ray Data 1 CPU / plain loop (per core)": [a / b for a, b in zip(rates[sides[2]], reference, strict=True)],
        "Ray Data 2 CPUs / 1 CPU (scaling)": [a / b for a, b in zip(rates[sides[3]], rates[sides[2]], strict=True)],
    }
    for name, ratios in checks.items():
        median, goal = statistics.median(ratios), GOALS[name]
        verdict = "PASS" if median >= goal else "FAIL"
        print(f"{verdict}  {name}: median {median:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x), goal >= {goal}x")


if __name__ == "__main__":
    main()
