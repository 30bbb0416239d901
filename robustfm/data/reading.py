"""Reading shards with Ray Data: open, decode with the joint train / eval transform, iterate torch batches.

The transforms live in :mod:`robustfm.data.transforms` (seeded per sample, one box and flip for a row's image and
masks). Ray Data runs with ``preserve_order`` so that the order rows are emitted in is the order the datasets were
built in.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from robustfm.data.shards import DECODED_KINDS, ColumnKind, ColumnSpec, Location, list_split
from robustfm.data.transforms import (
    DEFAULT_CROP_SCALE,
    center_box,
    random_resized_box,
    transform_image,
    transform_row,
)

if TYPE_CHECKING:
    import ray.data

__all__ = [
    "DEFAULT_CROP_SCALE",
    "center_box",
    "decode_images",
    "decoded_kinds",
    "iter_worker_batches",
    "open_shards",
    "ordered_execution",
    "random_resized_box",
    "to_torch_batch",
    "transform_image",
    "transform_row",
]


def ordered_execution() -> None:
    """Make this process's Ray Data keep row order (a resumed run must see rows in exactly the same order), and read
    Parquet with its task-based reader."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.execution_options.preserve_order = True
    # Ray 2.60's default Parquet reader (datasource V2) starts up to 32 footer-reading actors per read, each a new
    # process; for shard sets (tens to thousands of files, row counts already in the manifest) the task-based reader
    # is as fast and starts none: measured 3 reads of the demo split, 24 s of CPU vs 18 s on 2 cores.
    context.use_datasource_v2 = False


SMALL_SPLIT_BYTES = 256 * 2**20
"""Below this, a split read for an actor pool is re-blocked (:func:`open_shards` ``min_blocks``)."""


def open_shards(
    path: str,
    split: str = "train",
    *,
    endpoint_url: str | None = None,
    columns: Sequence[str] | None = None,
    include_paths: bool = False,
    min_blocks: int | None = None,
) -> ray.data.Dataset:
    """The rows of one split as a Ray Dataset, in manifest (shard, row) order.

    Args:
        path: shard directory, local or ``s3://bucket/prefix`` (credentials from the environment).
        endpoint_url: S3-compatible endpoint when not AWS (else ``$AWS_ENDPOINT_URL``).
        columns: columns to read (default: all).
        include_paths: add a ``path`` column naming each row's shard file.
        min_blocks: when the split has fewer shard files than this, or is small (< ``SMALL_SPLIT_BYTES``), split
            its rows into at least this many blocks. An actor pool hands out work by blocks: one block is one
            actor's task, so a pool scoring a small split with heavy per-row work needs several blocks to use all
            its actors. The split materializes the rows, which stays small: it happens only for few or small files.

    Raises:
        ManifestError: when ``path`` holds no finished conversion or has no ``split``.
        MissingColumnError: when ``columns`` names a column the shard set does not have.
    """
    import ray.data

    listing = list_split(Location(path, endpoint_url), split)
    location, shards = listing.location, listing.shards
    if columns is not None:
        listing.read_columns(columns, "open_shards")
    if not shards:
        raise ValueError(f"split {split!r} of {location.display()} has no images (every file was skipped?)")
    ordered_execution()
    files = [location.join(shard["file"]) for shard in shards]
    dataset = ray.data.read_parquet(
        files, filesystem=location.filesystem(), include_paths=include_paths, file_extensions=None
    )
    # A projection after the read: Ray Data pushes it down into the Parquet reader (only these columns are read).
    if columns is not None:
        dataset = dataset.select_columns([*columns, *(["path"] if include_paths else [])])
    rows = sum(int(shard["rows"]) for shard in shards)
    # Ray Data coalesces blocks below ~1 MiB, so a small split (12 shards of 100 KB) arrives as ONE block whatever
    # its file count; a large one has files enough and big blocks, and is never materialized here.
    small = sum(int(shard.get("bytes", 0)) for shard in shards) < SMALL_SPLIT_BYTES
    if min_blocks is not None and (len(files) < min_blocks or small) and rows > 1:
        dataset = dataset.repartition(min(max(min_blocks, len(files)), rows))  # keeps the row order (no shuffle)
    return dataset


class _DecodeBatch:
    """Ray Data UDF: replaces image and mask columns by their transformed pixels and adds ``epoch``."""

    def __init__(
        self,
        image_size: int,
        train: bool,
        seed: int,
        epoch: int,
        crop_scale: tuple[float, float],
        kinds: Mapping[str, str],
    ) -> None:
        self.args = (image_size, train, seed, epoch, crop_scale)
        self.kinds = dict(kinds)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        image_size, train, seed, epoch, crop_scale = self.args
        ids = batch["id"]
        present = [name for name in self.kinds if name in batch]
        decoded = [
            transform_row(
                {name: batch[name][k] for name in present}, self.kinds, str(i), image_size, train, seed, epoch,
                crop_scale,
            )
            for k, i in enumerate(ids)
        ]  # fmt: skip
        out = dict(batch)
        for name in present:
            out[name] = np.stack([row[name] for row in decoded])
        out["epoch"] = np.full(len(ids), epoch, dtype=np.int64)
        if "captions" in out:  # keep ragged caption lists as Python lists (Ray stores them as list<string>)
            out["captions"] = [list(c) for c in out["captions"]]
        return out


def decoded_kinds(columns: Mapping[str, ColumnSpec] | None) -> dict[str, str]:
    """Name -> kind of the columns the readers decode (image and mask kinds); ``None``: the ``image`` column only."""
    if columns is None:
        return {"image": ColumnKind.IMAGE}
    return {name: spec.kind for name, spec in columns.items() if spec.kind in DECODED_KINDS}


def decode_images(
    ds: ray.data.Dataset,
    image_size: int,
    train: bool,
    seed: int,
    epoch: int,
    crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE,
    batch_size: int = 32,
    columns: Mapping[str, ColumnSpec] | None = None,
) -> ray.data.Dataset:
    """Decode the ``image`` column (and the other image and mask columns of ``columns``) of every row.

    One joint transform per row (see :mod:`robustfm.data.transforms`). Train: a random-resized crop
    (``crop_scale`` area fraction) and a horizontal flip with probability 1/2, both drawn from
    ``sample_seed(id, epoch, "crop", seed)``. Eval: resize the shorter side to ``image_size`` (bicubic) and
    centre-crop. Images become float32 [3, S, S] in [0, 1], masks uint8 [1, S, S] (nearest: stored values only).
    Every other column is kept; ``epoch`` is added.

    Args:
        columns: the shard set's columns (:func:`robustfm.data.shard_columns`); None decodes ``image`` only.
    """
    decode = _DecodeBatch(image_size, train, seed, epoch, tuple(crop_scale), decoded_kinds(columns))
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
