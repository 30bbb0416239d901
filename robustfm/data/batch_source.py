"""Per-worker training batches from shards: the engine's ``BatchSource``, built on Ray Data.

The order of an epoch is a pure function of (manifest, seed, epoch):

1. the shards are put in a seeded random order (manifest order without shuffling);
2. consecutive groups of ``shuffle_window`` shards form windows, and the rows of each window are put in a seeded
   random order (the converter already mixes classes across shards, see ``PrepareConfig.mix_seed``);
3. the concatenated sequence is cut into ``world_size`` contiguous ranges of ``num_batches * batch_size`` rows
   (the tail is dropped), so every rank gets the same number of full batches and the shares are disjoint.

Skipping ``k`` consumed batches moves the start of the rank's range by ``k * batch_size`` rows before anything is
read or decoded, so a resumed run sees exactly the batches it had not consumed yet. Each window a rank needs is
one Ray Data task that reads its shards and emits the rank's rows in order: the whole pipeline streams (no
all-to-all shuffle) and each rank reads only about 1/world_size of the shards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from robustfm.data.reading import DEFAULT_CROP_SCALE, decode_images, iter_worker_batches, ordered_execution
from robustfm.data.shards import ColumnSpec, Location, SplitListing, list_split
from robustfm.seeding import epoch_seed

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs
    import ray.data

Stage = Callable[["ray.data.Dataset", int], "ray.data.Dataset"]


def epoch_sequence(
    shard_rows: Sequence[int], seed: int, epoch: int, shuffle: bool, window: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The epoch's order of all rows as (window, shard, row) arrays, following steps 1-2 of the module docstring."""
    order = np.arange(len(shard_rows))
    if shuffle:
        order = np.random.default_rng(epoch_seed(seed, epoch, "shard_order")).permutation(len(shard_rows))
    windows, shards, rows = [], [], []
    for w, start in enumerate(range(0, len(order), window)):
        members = order[start : start + window]
        shard = np.concatenate([np.full(shard_rows[s], s, dtype=np.int64) for s in members])
        row = np.concatenate([np.arange(shard_rows[s], dtype=np.int64) for s in members])
        if shuffle:
            mix = np.random.default_rng(epoch_seed(seed, epoch, f"window/{w}")).permutation(len(row))
            shard, row = shard[mix], row[mix]
        windows.append(np.full(len(row), w, dtype=np.int64))
        shards.append(shard)
        rows.append(row)
    return np.concatenate(windows), np.concatenate(shards), np.concatenate(rows)


class _ReadWindow:
    """Ray Data UDF: one work item (a window's picks) -> the picked rows of its shards, in pick order."""

    def __init__(self, filesystem: pafs.FileSystem, files: list[str], columns: list[str] | None = None) -> None:
        self.filesystem = filesystem
        self.files = files
        self.columns = columns

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = []
        for shards, rows in zip(batch["shards"], batch["rows"], strict=True):
            shards, rows = np.asarray(shards, dtype=np.int64), np.asarray(rows, dtype=np.int64)
            needed = sorted(set(shards.tolist()))
            loaded = [pq.read_table(self.files[s], filesystem=self.filesystem, columns=self.columns) for s in needed]
            offsets = np.cumsum([0] + [t.num_rows for t in loaded])
            position = {s: offsets[i] for i, s in enumerate(needed)}
            combined = pa.concat_tables(loaded)
            take = np.array([position[s] for s in shards.tolist()], dtype=np.int64) + rows
            tables.append(combined.take(pa.array(take)))
        return pa.concat_tables(tables)


class ShardBatchSource:
    """Torch batches of one split for each Ray Train worker (the engine's ``BatchSource`` protocol).

    Picklable: only paths and numbers are stored; the manifest is read lazily in the worker.

    Args:
        path: shard directory (local or ``s3://``).
        split: split to read ("train", "val", ...).
        image_size: side of the square images.
        batch_size: per-worker batch size.
        train: train transform (seeded random-resized crop + flip) or eval transform (resize + centre crop).
        seed: run seed for shuffles and crops.
        stages: Ray Data stages ``(dataset, epoch) -> dataset`` applied after decoding (corruptions, GT maps, ...).
        columns: columns to read (default: every column of the shard set); ``id`` and ``image`` are always read.
            Image and mask columns are decoded with the row's image (one joint transform): images float32
            [3, S, S], masks uint8 [1, S, S].
        shuffle: seeded per-epoch shuffle (default: ``train``).
        crop_scale: area fraction range of training crops.
        shuffle_window: shards whose rows are shuffled together (more mixes better; each read task holds that
            many shards in memory).
        holdout_fraction: share of the split held out as a validation part: every ``round(1 / fraction)``-th row
            by global index (manifest order), so the held-out set does not depend on seed or epoch. 0: none.
        holdout_role: ``"exclude"`` iterates the split without the held-out rows (training), ``"only"`` iterates
            just the held-out rows (validation).
        rows: iterate only these rows of the split, by global index in manifest order (a subset chosen on the
            driver, e.g. CFT's few images of a few classes; see :meth:`SplitListing.read_rows`). None: every row.
            The held-out rule applies on top, by the same global index.
        endpoint_url: S3-compatible endpoint URL, when not AWS.
    """

    def __init__(
        self,
        path: str,
        split: str,
        image_size: int,
        batch_size: int,
        train: bool,
        seed: int = 0,
        stages: Sequence[Stage] = (),
        *,
        shuffle: bool | None = None,
        crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE,
        shuffle_window: int = 4,
        endpoint_url: str | None = None,
        holdout_fraction: float = 0.0,
        holdout_role: Literal["exclude", "only"] = "exclude",
        columns: Sequence[str] | None = None,
        rows: Sequence[int] | None = None,
    ) -> None:
        if batch_size <= 0 or image_size <= 0 or shuffle_window <= 0:
            raise ValueError(
                f"batch_size, image_size and shuffle_window must be positive, got {batch_size}, {image_size}, "
                f"{shuffle_window}"
            )
        if not 0 <= holdout_fraction < 1 or holdout_role not in ("exclude", "only"):
            raise ValueError(
                f"holdout_fraction must be in [0, 1) and holdout_role 'exclude' or 'only', got {holdout_fraction} "
                f"and {holdout_role!r}"
            )
        self.path = path
        self.split = split
        self.image_size = image_size
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.stages = tuple(stages)
        self.shuffle = train if shuffle is None else shuffle
        self.crop_scale = tuple(crop_scale)
        self.shuffle_window = shuffle_window
        self.endpoint_url = endpoint_url
        self.holdout_period = round(1 / holdout_fraction) if holdout_fraction > 0 else 0
        self.holdout_role = holdout_role
        self.columns = None if columns is None else tuple(dict.fromkeys(["id", "image", *columns]))
        self.rows = None if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
        self._listing: SplitListing | None = None

    def __getstate__(self) -> dict[str, Any]:
        # re-read the manifest where the source is used
        return {**self.__dict__, "_listing": None}

    def _split_listing(self) -> SplitListing:
        if self._listing is None:
            self._listing = list_split(Location(self.path, self.endpoint_url), self.split)
        return self._listing

    def _shard_list(self) -> list[dict[str, Any]]:
        return self._split_listing().shards

    def read_columns(self) -> dict[str, ColumnSpec]:
        """The columns this source reads (name -> spec), checked against the shard set's manifest.

        Raises:
            MissingColumnError: naming the requested columns the shard set lacks and the shard directory.
        """
        return self._split_listing().read_columns(self.columns, "ShardBatchSource")

    @property
    def num_rows(self) -> int:
        """Images this source iterates: the split (or its ``rows``), minus (or only) its held-out rows."""
        total = sum(int(shard["rows"]) for shard in self._shard_list())
        if self.rows is None and not self.holdout_period:
            return total
        return int(self._keep(np.arange(total, dtype=np.int64), total).sum())

    def _keep(self, global_index: np.ndarray, total: int) -> np.ndarray:
        """Which rows (by global index) this source iterates: within ``rows``, then the held-out rule."""
        keep = np.ones(len(global_index), dtype=bool)
        if self.rows is not None:
            if len(self.rows) and (self.rows[0] < 0 or self.rows[-1] >= total):
                raise ValueError(f"rows must index the {total} rows of split {self.split!r} of {self.path}")
            keep &= np.isin(global_index, self.rows)
        if self.holdout_period:
            held_out = global_index % self.holdout_period == 0
            keep &= held_out if self.holdout_role == "only" else ~held_out
        return keep

    def num_batches(self, epoch: int, rank: int, world_size: int) -> int:
        """Full batches every rank gets in ``epoch`` (the same on every rank; the tail of the epoch is dropped)."""
        return self.num_rows // (self.batch_size * world_size)

    def dataset(self, epoch: int, rank: int, world_size: int, skip_batches: int = 0) -> ray.data.Dataset:
        """This rank's share of ``epoch`` as a decoded Ray Dataset (stages applied), after ``skip_batches``."""
        import ray.data

        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        shards = self._shard_list()
        per_rank = self.num_batches(epoch, rank, world_size) * self.batch_size
        if per_rank == 0:
            raise ValueError(
                f"split {self.split!r} of {self.path} has {self.num_rows} images: fewer than one batch of "
                f"{self.batch_size} for each of {world_size} workers"
            )
        window_size = self.shuffle_window if self.shuffle else 1
        shard_rows = [int(s["rows"]) for s in shards]
        windows, shard_ids, rows = epoch_sequence(shard_rows, self.seed, epoch, self.shuffle, window_size)
        if self.rows is not None or self.holdout_period:
            offsets = np.concatenate([[0], np.cumsum(shard_rows)[:-1]]).astype(np.int64)
            keep = self._keep(offsets[shard_ids] + rows, sum(shard_rows))
            windows, shard_ids, rows = windows[keep], shard_ids[keep], rows[keep]
        start = rank * per_rank + min(skip_batches * self.batch_size, per_rank)
        end = (rank + 1) * per_rank
        windows, shard_ids, rows = windows[start:end], shard_ids[start:end], rows[start:end]
        items = []
        for w in np.unique(windows):  # windows appear in sequence order, so np.unique keeps it
            picked = windows == w
            items.append({"shards": shard_ids[picked].tolist(), "rows": rows[picked].tolist()})
        columns = self.read_columns()
        location = self._split_listing().location
        files = [location.join(s["file"]) for s in shards]
        ordered_execution()
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        read = _ReadWindow(location.filesystem(), files, None if self.columns is None else list(columns))
        ds = ds.map_batches(read, batch_size=1, batch_format="numpy")
        ds = decode_images(ds, self.image_size, self.train, self.seed, epoch, self.crop_scale, columns=columns)
        for stage in self.stages:
            ds = stage(ds, epoch)
        return ds

    def batches(self, epoch: int, rank: int, world_size: int, skip_batches: int = 0) -> Iterator[dict[str, Any]]:
        """Torch batches of this rank's share of ``epoch``, from batch ``skip_batches`` on."""
        if skip_batches >= self.num_batches(epoch, rank, world_size):
            return iter(())
        from ray.data import DataContext

        # Each epoch is a new dataset: per-dataset progress bars from every worker would flood the driver's log
        # (the engine reports the training progress itself).
        DataContext.get_current().enable_progress_bars = False
        return iter_worker_batches(self.dataset(epoch, rank, world_size, skip_batches), self.batch_size, drop_last=True)
