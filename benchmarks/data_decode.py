"""Decode + resize throughput of the Ray Data reading path against a plain single-process PIL loop.

    python benchmarks/data_decode.py [--images 384] [--source-size 384] [--image-size 224]

Builds shards from scikit-image photos (random crops, JPEG) and generated images through the normal prepare path,
then decodes the same shards (eval transform: shorter side to ``image-size``, centre crop, float32 CHW) with:

- the reference: a plain PIL loop in this process (open, convert RGB, resize, crop, to float32);
- robustfm's transform in this process (same loop, with reduced-scale JPEG decoding);
- ``decode_images(open_shards(...))`` through Ray Data on a local Ray with 1 CPU, then with 2 CPUs.

Prints images/s and each one's ratio to the reference, all measured in this run (best of ``--repeats``).
"""

from __future__ import annotations

import argparse
import io
import os
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


def local_rate(images: list[bytes], ids: list[str], size: int, robustfm_transform: bool, repeats: int) -> float:
    from robustfm.data.reading import DEFAULT_CROP_SCALE, transform_image

    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for data, sample_id in zip(images, ids, strict=True):
            if robustfm_transform:
                transform_image(data, sample_id, size, False, 0, 0, DEFAULT_CROP_SCALE)
            else:
                plain_pil(data, size)
        best = max(best, len(images) / (time.perf_counter() - start))
    return best


def ray_rate(shards: Path, size: int, num_cpus: int, repeats: int) -> float:
    import ray

    from robustfm.data.reading import decode_images, open_shards

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        best = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            rows = 0
            ds = decode_images(open_shards(str(shards), "train"), size, train=False, seed=0, epoch=0)
            for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
                rows += len(batch["id"])
            best = max(best, rows / (time.perf_counter() - start))
        return best
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--source-size", type=int, default=384, help="width of the stored JPEGs (height 3/4 of it)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        shards = build_shards(Path(tmp), args.images, args.source_size)
        ray.shutdown()
        tables = [pq.read_table(p, columns=["id", "image"]) for p in sorted((shards / "train").glob("*.parquet"))]
        ids = [i for t in tables for i in t.column("id").to_pylist()]
        images = [b for t in tables for b in t.column("image").to_pylist()]

        reference = local_rate(images, ids, args.image_size, robustfm_transform=False, repeats=args.repeats)
        results = {
            "robustfm transform, 1 process": local_rate(images, ids, args.image_size, True, args.repeats),
            "Ray Data, 1 CPU": ray_rate(shards, args.image_size, 1, args.repeats),
            "Ray Data, 2 CPUs": ray_rate(shards, args.image_size, 2, args.repeats),
        }
    load = os.getloadavg()[0]
    print(
        f"data_decode: {len(images)} JPEGs {args.source_size}x{args.source_size * 3 // 4} -> {args.image_size}px, "
        f"{os.cpu_count()} cores, load average {load:.1f}"
    )
    print(f"  plain PIL loop (reference): {reference:8.1f} img/s  1.00x")
    for name, rate in results.items():
        print(f"  {name + ':':<29} {rate:8.1f} img/s  {rate / reference:.2f}x")


if __name__ == "__main__":
    main()
