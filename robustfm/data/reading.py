"""Reading shards with Ray Data: open, decode with seeded crops, and iterate torch batches in a worker.

Every random draw of the train transform comes from ``sample_seed(id, epoch, "crop", seed)``, so a sample gets the
same crop and flip whatever block, batch, worker or rerun it lands in. Ray Data runs with ``preserve_order`` so
that the order rows are emitted in is the order the datasets were built in.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from robustfm.data.images import decode_crop_resize
from robustfm.data.shards import Location, load_manifest, split_shards
from robustfm.seeding import sample_seed

if TYPE_CHECKING:
    import ray.data

DEFAULT_CROP_SCALE = (0.9, 1.0)  # open_clip's fine-tuning default for RandomResizedCrop's area fraction
_RATIO = (3 / 4, 4 / 3)


def ordered_execution() -> None:
    """Make this process's Ray Data keep row order (a resumed run must see rows in exactly the same order)."""
    from ray.data import DataContext

    DataContext.get_current().execution_options.preserve_order = True


def open_shards(
    path: str,
    split: str = "train",
    *,
    endpoint_url: str | None = None,
    columns: Sequence[str] | None = None,
    include_paths: bool = False,
) -> ray.data.Dataset:
    """The rows of one split as a Ray Dataset, in manifest (shard, row) order.

    Args:
        path: shard directory, local or ``s3://bucket/prefix`` (credentials from the environment).
        endpoint_url: S3-compatible endpoint when not AWS (else ``$AWS_ENDPOINT_URL``).
        columns: columns to read (default: all).
        include_paths: add a ``path`` column naming each row's shard file.

    Raises:
        ManifestError: when ``path`` holds no finished conversion or has no ``split``.
    """
    import ray.data

    location = Location(path, endpoint_url)
    manifest = load_manifest(location)
    shards = split_shards(manifest, split, location.display("manifest.json"))
    if not shards:
        raise ValueError(f"split {split!r} of {location.display()} has no images (every file was skipped?)")
    ordered_execution()
    files = [location.join(shard["file"]) for shard in shards]
    return ray.data.read_parquet(
        files,
        filesystem=location.filesystem(),
        columns=list(columns) if columns is not None else None,
        include_paths=include_paths,
        file_extensions=None,
    )


def random_resized_box(
    width: int, height: int, rng: np.random.Generator, scale: tuple[float, float]
) -> tuple[float, ...]:
    """A random crop box (left, top, right, bottom) of ``scale`` area fraction and aspect in [3/4, 4/3].

    Same distribution as torchvision's RandomResizedCrop, drawn from ``rng`` (10 tries, then a centred crop).
    """
    area = width * height
    log_ratio = (math.log(_RATIO[0]), math.log(_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = round(math.sqrt(target * aspect))
        crop_h = round(math.sqrt(target / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = int(rng.integers(0, width - crop_w + 1))
            top = int(rng.integers(0, height - crop_h + 1))
            return (left, top, left + crop_w, top + crop_h)
    aspect = width / height
    if aspect < _RATIO[0]:
        crop_w, crop_h = width, round(width / _RATIO[0])
    elif aspect > _RATIO[1]:
        crop_w, crop_h = round(height * _RATIO[1]), height
    else:
        crop_w, crop_h = width, height
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return (left, top, left + crop_w, top + crop_h)


def center_box(width: int, height: int) -> tuple[float, ...]:
    """The centred square of side min(width, height): "resize the shorter side, then centre-crop"."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def transform_image(
    data: bytes, sample_id: str, image_size: int, train: bool, seed: int, epoch: int, crop_scale: tuple[float, float]
) -> np.ndarray:
    """Decode one encoded image into float32 [3, S, S] in [0, 1] with the train or eval transform."""
    if train:
        rng = np.random.default_rng(sample_seed(sample_id, epoch, "crop", seed))
        pixels = decode_crop_resize(data, lambda w, h: random_resized_box(w, h, rng, crop_scale), image_size, sample_id)
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
    else:
        pixels = decode_crop_resize(data, center_box, image_size, sample_id)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)


class _DecodeBatch:
    """Ray Data UDF: replaces the ``image`` bytes column by float32 pixels and adds ``epoch``."""

    def __init__(self, image_size: int, train: bool, seed: int, epoch: int, crop_scale: tuple[float, float]) -> None:
        self.args = (image_size, train, seed, epoch, crop_scale)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        image_size, train, seed, epoch, crop_scale = self.args
        ids = batch["id"]
        pixels = np.stack(
            [
                transform_image(data, str(i), image_size, train, seed, epoch, crop_scale)
                for data, i in zip(batch["image"], ids, strict=True)
            ]
        )
        out = dict(batch)
        out["image"] = pixels
        out["epoch"] = np.full(len(ids), epoch, dtype=np.int64)
        if "captions" in out:  # keep ragged caption lists as Python lists (Ray stores them as list<string>)
            out["captions"] = [list(c) for c in out["captions"]]
        return out


def decode_images(
    ds: ray.data.Dataset,
    image_size: int,
    train: bool,
    seed: int,
    epoch: int,
    crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE,
    batch_size: int = 32,
) -> ray.data.Dataset:
    """Decode the ``image`` column into float32 [3, S, S] pixels in [0, 1].

    Train: a random-resized crop (``crop_scale`` area fraction) and a horizontal flip with probability 1/2, both
    drawn from ``sample_seed(id, epoch, "crop", seed)``. Eval: resize the shorter side to ``image_size`` (bicubic)
    and centre-crop. Every other column is kept; ``epoch`` is added.
    """
    decode = _DecodeBatch(image_size, train, seed, epoch, tuple(crop_scale))
    return ds.map_batches(decode, batch_size=batch_size, batch_format="numpy", zero_copy_batch=True)


def to_torch_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """Numeric columns -> torch tensors; strings and lists -> Python lists."""
    import torch

    out: dict[str, Any] = {}
    for name, column in batch.items():
        if isinstance(column, np.ndarray) and column.dtype.kind in "biuf":
            out[name] = torch.from_numpy(np.array(column, copy=True))  # Ray hands out read-only views
        else:
            out[name] = [list(v) if isinstance(v, (np.ndarray, list, tuple)) else v for v in column]
    return out


def iter_worker_batches(
    dataset: ray.data.Dataset, batch_size: int, skip_batches: int = 0, drop_last: bool = True
) -> Iterator[dict[str, Any]]:
    """Iterate a (decoded) dataset as torch batches, after skipping ``skip_batches`` whole batches.

    Skipping here still reads and decodes the skipped rows; :class:`ShardBatchSource` skips before decoding.
    """
    for index, batch in enumerate(
        dataset.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last)
    ):
        if index < skip_batches:
            continue
        yield to_torch_batch(batch)
