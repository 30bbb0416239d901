"""Convert a COCO / ImageNet / image-folder tree into shards, in parallel with Ray, resumably.

The source is listed on the driver first, so a wrong root or layout fails before Ray starts. The file list is put
in a seeded random order (``mix_seed``: class-mixed shards) and cut into shards of ``shard_size`` items (the plan
depends only on the listing and the config, so a rerun makes the same plan). Ray tasks read, check and (when
needed) convert the images of one shard each and return the Parquet bytes; the driver writes each shard
atomically, then its done record. Writing on the driver keeps a local output on the
driver's disk even on a multi-node cluster, and means an interrupted run never leaves a task writing behind it.

A rerun skips every shard whose done record matches the plan (same item ids, same columns) and whose file is present
with the recorded checksum, converts the rest, and rewrites the manifest.

Masks (``source.masks``) come from a tree mirroring the images (see :class:`~robustfm.data.config.SourceConfig`) and
go into a ``mask`` column (per-concept files merged, ``source.mask_format`` decoded by
:mod:`robustfm.data.concept_masks`); an image without a usable mask is skipped with a ``mask_*`` reason, never given
an empty mask. A source may also list extra columns of its own (``SourceListing.columns``: further images, group keys,
numbers), which the converter reads and checks the same way.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from robustfm.data.concept_masks import MaskTreeReader
from robustfm.data.config import PrepareConfig
from robustfm.data.images import ImageDecodeError, inspect_image
from robustfm.data.row_columns import MaskTree, RowSkipped, listed_values, read_source
from robustfm.data.shards import (
    BASE_SPECS,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    ColumnKind,
    ColumnSpec,
    Location,
    check_extra_columns,
    done_record_name,
    encode_shard,
    exists,
    read_bytes,
    read_json,
    sha256,
    shard_name,
    write_bytes_atomic,
    write_json_atomic,
)
from robustfm.data.sources import SOURCES, LayoutError, SourceItem, SourceListing

MASK_COLUMN = "mask"
"""The column ``source.masks`` fills."""


@dataclass(frozen=True)
class ShardPlan:
    """The items one shard is made of."""

    split: str
    index: int
    items: tuple[SourceItem, ...]
    variant: str = ""
    """What else decides the shard's content (extra columns, mask tree); empty for base columns only."""

    @property
    def file(self) -> str:
        """Path of the shard relative to the output."""
        return f"{self.split}/{shard_name(self.index)}"

    @property
    def fingerprint(self) -> str:
        """Identifies the plan: a done record of another plan (other shard size, other files) is not reused."""
        text = "\n".join(item.id for item in self.items)
        return hashlib.sha256((text + (f"\n#{self.variant}" if self.variant else "")).encode()).hexdigest()


@dataclass
class PrepareSummary:
    """What a conversion produced."""

    output: str
    counts: dict[str, int]
    """split -> images in the shards."""
    counts_per_class: dict[str, dict[str, int]]
    skipped_by_reason: dict[str, int]
    shards_written: int
    shards_reused: int
    skipped: list[dict[str, str]] = field(default_factory=list)

    def format(self) -> str:
        """A few lines for the end of the job."""
        lines = [f"shards in {self.output}: {self.shards_written} written, {self.shards_reused} reused (resumed)"]
        for split, count in self.counts.items():
            per_class = self.counts_per_class.get(split, {})
            lines.append(f"  {split}: {count} images in {len(per_class)} classes")
        if self.skipped_by_reason:
            reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.skipped_by_reason.items()))
            lines.append(
                f"  skipped {sum(self.skipped_by_reason.values())} files: {reasons} (listed in {MANIFEST_NAME})"
            )
        else:
            lines.append("  skipped 0 files")
        return "\n".join(lines)


def plan_shards(
    listing: SourceListing, shard_size: int, mix_seed: int | None = 0, variant: str = ""
) -> list[ShardPlan]:
    """Cut every split's items (in a ``mix_seed`` random order, or listing order for None) into shards."""
    plans = []
    for split, listed in listing.splits.items():
        items = list(listed)
        if mix_seed is not None:
            order = np.random.default_rng(mix_seed).permutation(len(items))
            items = [items[i] for i in order]
        for index, start in enumerate(range(0, len(items), shard_size)):
            plans.append(ShardPlan(split, index, tuple(items[start : start + shard_size]), variant))
    return plans


def convert_shard(
    source_fs: pafs.FileSystem,
    source_base: str,
    plan: ShardPlan,
    columns: dict[str, ColumnSpec] | None = None,
    masks: MaskTree | None = None,
    mask_format: str = "binary",
) -> tuple[bytes | None, dict[str, Any]]:
    """Read, check and encode the images (and masks, and extra columns) of one shard.

    Args:
        columns: the shards' extra columns: the listing's (values from ``SourceItem.extra``) and, with ``masks``,
            :data:`MASK_COLUMN`.
        masks: the mask tree, when masks are attached.
        mask_format: how its files encode masks (``source.mask_format``; :mod:`robustfm.data.concept_masks`).

    Returns:
        The Parquet bytes (None when every file was skipped) and the shard's done record (without checksum).
    """
    columns = dict(columns or {})
    listed = {name: spec for name, spec in columns.items() if masks is None or name != MASK_COLUMN}
    mask_reader = MaskTreeReader(masks, mask_format) if masks is not None else None
    rows, skipped = [], []
    counts: Counter[str] = Counter()
    for item in plan.items:
        try:
            try:
                image = inspect_image(read_source(source_fs, source_base, item.path), item.path)
            except ImageDecodeError as err:
                raise RowSkipped(err.reason, err.detail) from None
            values = listed_values(source_fs, source_base, item, listed, image.width, image.height)
            if mask_reader is not None:
                values[MASK_COLUMN] = mask_reader.mask(item, plan.split, image.width, image.height)
        except RowSkipped as skip:
            skipped.append({"split": plan.split, "path": item.path, "reason": skip.reason, "detail": skip.detail})
            continue
        rows.append(
            {
                "id": item.id,
                "image": image.data,
                "label": item.label,
                "class_name": item.class_name,
                "captions": list(item.captions),
                "source_path": item.path,
                "width": image.width,
                "height": image.height,
                **values,
            }
        )
        counts[item.class_name] += 1
    record = {
        "split": plan.split,
        "index": plan.index,
        "file": plan.file if rows else None,
        "rows": len(rows),
        "fingerprint": plan.fingerprint,
        "counts_per_class": dict(sorted(counts.items())),
        "skipped": skipped,
    }
    return (encode_shard(rows, columns) if rows else None), record


def _finished_record(fs: pafs.FileSystem, out: Location, plan: ShardPlan, verify: bool) -> dict[str, Any] | None:
    record_path = out.join(done_record_name(plan.split, plan.index))
    if not exists(fs, record_path):
        return None
    record = read_json(fs, record_path)
    if record.get("fingerprint") != plan.fingerprint:
        return None
    if record.get("file") is None:
        return record
    shard_path = out.join(record["file"])
    if not exists(fs, shard_path):
        return None
    if verify and sha256(read_bytes(fs, shard_path)) != record.get("sha256"):
        return None
    return record


def _ensure_ray(config: PrepareConfig) -> Any:
    import ray

    from robustfm.runtime import init_ray

    init_ray(config.ray, log_to_driver=False)
    return ray


def run(config: PrepareConfig, on_shard_done: Callable[[dict[str, Any]], None] | None = None) -> PrepareSummary:
    """Convert ``config.source`` into shards under ``config.output`` and write the manifest.

    Args:
        on_shard_done: called on the driver with each newly written shard's done record (tests use it to simulate
            an interruption by raising).

    Raises:
        LayoutError: before Ray starts, when the root is missing or matches no layout of ``config.source.kind``.
    """
    from tqdm.auto import tqdm

    source = Location(config.source.root, config.s3_endpoint_url)
    out = Location(config.output, config.s3_endpoint_url)
    listing = SOURCES.get(config.source.kind)(source, config.source.splits)
    masks, columns = _columns(config, listing)
    # Other columns make other shards: a done record written without them must not be reused.
    described = {"columns": {n: c.to_json() for n, c in columns.items()}, "masks": config.source.masks}
    if config.source.mask_format != "binary":  # only then: shards prepared before the option existed stay reusable
        described["mask_format"] = config.source.mask_format
    plans = plan_shards(listing, config.shard_size, config.mix_seed, json.dumps(described) if columns else "")
    out_fs = out.filesystem()

    records: dict[tuple[str, int], dict[str, Any]] = {}
    pending = []
    for plan in plans:
        record = _finished_record(out_fs, out, plan, config.verify_checksums)
        if record is None:
            pending.append(plan)
        else:
            records[(plan.split, plan.index)] = record
    reused = len(records)
    progress = tqdm(total=sum(len(p.items) for p in plans), unit="img", desc="prepare", disable=not config.progress)
    progress.update(sum(len(p.items) for p in plans if (p.split, p.index) in records))

    if pending:
        ray = _ensure_ray(config)
        convert = ray.remote(num_cpus=config.cpus_per_task)(convert_shard)
        source_fs = source.filesystem()
        # Bounded in-flight tasks: results (whole shards) wait in the object store until the driver writes them.
        max_in_flight = max(2, 2 * int(ray.cluster_resources().get("CPU", 1) / config.cpus_per_task))
        queue = list(pending)
        in_flight: dict[Any, ShardPlan] = {}
        try:
            while queue or in_flight:
                while queue and len(in_flight) < max_in_flight:
                    plan = queue.pop(0)
                    ref = convert.remote(source_fs, source.base, plan, columns, masks, config.source.mask_format)
                    in_flight[ref] = plan
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                plan = in_flight.pop(ready[0])
                data, record = ray.get(ready[0])
                if data is not None:
                    write_bytes_atomic(out, out.join(plan.file), data)
                    record.update(sha256=sha256(data), bytes=len(data))
                write_json_atomic(out, out.join(done_record_name(plan.split, plan.index)), record)
                records[(plan.split, plan.index)] = record
                progress.update(len(plan.items))
                if on_shard_done is not None:
                    on_shard_done(record)
        except BaseException:
            for ref in in_flight:
                ray.cancel(ref)
            raise
        finally:
            progress.close()
    else:
        progress.close()

    manifest = build_manifest(config, listing, plans, records, columns)
    write_json_atomic(out, out.join(MANIFEST_NAME), manifest)
    return PrepareSummary(
        output=out.display(),
        counts={split: entry["count"] for split, entry in manifest["splits"].items()},
        counts_per_class={split: entry["counts_per_class"] for split, entry in manifest["splits"].items()},
        skipped_by_reason=manifest["skipped_by_reason"],
        shards_written=len(records) - reused,
        shards_reused=reused,
        skipped=manifest["skipped"],
    )


def _columns(config: PrepareConfig, listing: SourceListing) -> tuple[MaskTree | None, dict[str, ColumnSpec]]:
    """The mask tree (checked to exist, before Ray starts) and every extra column the shards will have."""
    columns = check_extra_columns(listing.columns)
    if config.source.masks is None:
        return None, columns
    if MASK_COLUMN in columns:
        raise ValueError(f"source {listing.kind!r} lists a {MASK_COLUMN!r} column itself: leave source.masks unset")
    location = Location(config.source.masks, config.s3_endpoint_url)
    fs = location.filesystem()
    if fs.get_file_info(location.base).type != pafs.FileType.Directory:
        raise LayoutError(
            f"source.masks {location.display()} does not exist or is not a directory; expected a tree of "
            "<path>/<image name>.png masks mirroring the images under source.root"
        )
    columns[MASK_COLUMN] = ColumnSpec(ColumnKind.MASK, config.source.mask_meaning)
    return MaskTree(fs, location.base), columns


def build_manifest(
    config: PrepareConfig,
    listing: SourceListing,
    plans: list[ShardPlan],
    records: dict[tuple[str, int], dict[str, Any]],
    extra: dict[str, ColumnSpec] | None = None,
) -> dict[str, Any]:
    """The ``manifest.json`` content, from the done records of every planned shard.

    Args:
        extra: the shards' extra columns (declared in the ``columns`` section with the base ones).
    """
    from robustfm import __version__

    splits: dict[str, dict[str, Any]] = {}
    skipped = list(listing.skipped)
    for split in listing.splits:
        shards, counts = [], Counter()
        for plan in (p for p in plans if p.split == split):
            record = records[(plan.split, plan.index)]
            skipped.extend(record["skipped"])
            counts.update(record["counts_per_class"])
            if record["file"] is not None:
                shards.append({key: record[key] for key in ("file", "rows", "sha256", "bytes")})
        splits[split] = {
            "count": sum(counts.values()),
            "counts_per_class": dict(sorted(counts.items())),
            "shards": shards,
        }
    source: dict[str, Any] = {"kind": listing.kind, "root": listing.root, "splits": list(listing.splits)}
    if config.source.masks is not None:
        source["masks"] = Location(config.source.masks, config.s3_endpoint_url).canonical
        source["mask_format"] = config.source.mask_format
    return {
        "format": "robustfm-shards",
        "schema_version": SCHEMA_VERSION,
        "columns": {name: spec.to_json() for name, spec in {**BASE_SPECS, **(extra or {})}.items()},
        "source": source,
        "classes": list(listing.classes),
        "class_ids": list(listing.class_ids),
        "shard_size": config.shard_size,
        "splits": splits,
        "skipped": skipped,
        "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skipped).items())),
        "created_by": f"robustfm {__version__}",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
