"""Config sections of the data part: converting a source to shards, and reading shards for training."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from robustfm.config.core import check
from robustfm.config.schema import RayConfig


def _is_s3(path: str) -> bool:
    return path.startswith("s3://")


@dataclass(frozen=True)
class SourceConfig:
    """Where the original images are and how they are laid out."""

    kind: str = "image_folder"
    """A name from ``robustfm.data.SOURCES``: ``coco`` (train2017/ + annotations/), ``imagenet`` (train/<wnid>/,
    val/), ``image_folder`` (<class>/<image>, optionally under <split>/); 2AFC triplets: ``nights`` (data.csv, ref/,
    distort/), ``bapps`` (2afc/<split>/<subset>/{ref,p0,p1,judge}/)."""
    root: str = ""
    """Local directory or ``s3://bucket/prefix`` holding the tree."""
    splits: tuple[str, ...] = ()
    """Splits to convert (``train``, ``val``); empty: every split the tree has."""
    masks: str | None = None
    """Root (local or ``s3://``) of a tree of per-image masks mirroring the images: the mask of
    ``<root>/<path>/<name>.<ext>`` is ``<masks>/<path>/<name>.png``, where ``<path>`` may also leave out the split
    folder (``<masks>/<class>/<name>.png`` for ``<root>/train/<class>/<name>.jpg``). Masks are stored in a ``mask``
    column (8-bit PNG, values kept exactly). An image whose mask is missing, unreadable or of another size is
    skipped and listed in the manifest (reasons ``mask_missing``, ``mask_invalid``, ``mask_size_mismatch``),
    never given an empty mask. Per-concept files ``<name>__<concept>.png`` beside (or instead of) ``<name>.png``
    are merged by maximum: CFT's S(I) = max_k M_k(I) (:mod:`robustfm.data.concept_masks`). None: no masks."""
    mask_format: Literal["binary", "imagenet_s"] = "binary"
    """How mask files encode their values. ``binary``: single-channel 8-bit files, values kept exactly.
    ``imagenet_s``: RGB PNGs with label = R + 256*G (ImageNet-S, the CFT authors' files), stored as 0/255 with
    labels 0 and 1000 as background (labels up to 999 do not fit 8 bits; the row's class is in ``label``)."""
    mask_meaning: str = "foreground mask: 0 background, >0 foreground"
    """What the mask values mean, recorded in the manifest's ``columns`` section."""

    def __post_init__(self) -> None:
        from robustfm.data.sources import SOURCES  # the registry lists names without importing any source

        check(bool(self.root), "root", self.root, "must name the directory (or s3:// prefix) holding the data")
        check(self.masks is None or bool(self.masks), "masks", self.masks, "must name a directory or be null")
        check(
            self.masks is None or self.masks.rstrip("/") != self.root.rstrip("/"),
            "masks",
            self.masks,
            "must be another tree than root (the image lister would take the masks for images)",
        )
        check(
            self.mask_format in ("binary", "imagenet_s"),
            "mask_format",
            self.mask_format,
            "must be binary or imagenet_s",
        )
        check(
            self.masks is not None or self.mask_format == "binary",
            "mask_format",
            self.mask_format,
            "needs source.masks (the tree of mask files it describes)",
        )
        try:
            SOURCES.check(self.kind)
        except KeyError as err:
            check(False, "kind", self.kind, str(err))


@dataclass(frozen=True)
class PrepareConfig:
    """``jobs/prepare_data.py``: convert a source tree into Parquet shards plus ``manifest.json``."""

    source: SourceConfig = field(default_factory=SourceConfig)
    """What to convert."""
    output: str = "data/shards"
    """Directory or ``s3://bucket/prefix`` for the shards; rerunning with the same output resumes."""
    shard_size: int = 1000
    """Images per shard (before skipped files are removed). ~1000 ImageNet JPEGs make a ~110 MB shard: large
    enough for efficient S3 reads, small enough to parallelise a conversion over many CPUs."""
    mix_seed: int | None = 0
    """Each split's files are put in this seeded random order before being cut into shards, so every shard is a
    class-mixed sample (readers shuffle shard order and rows within windows of shards; they rely on it). None keeps
    the listing order (sorted paths): shards then hold one or two classes each."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, a test server) when not AWS; ``$AWS_ENDPOINT_URL`` is used when unset.
    Only the URL: credentials always come from the environment (never from configs)."""
    verify_checksums: bool = True
    """On resume, re-hash finished shards before trusting them (reads every finished shard once)."""
    cpus_per_task: float = 1.0
    """CPUs each conversion task reserves."""
    progress: bool = True
    """Show a tqdm progress bar on the driver."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray to start when none is running."""

    def __post_init__(self) -> None:
        check(self.shard_size > 0, "shard_size", self.shard_size, "must be positive")
        check(bool(self.output), "output", self.output, "must name a directory or s3:// prefix")
        check(self.cpus_per_task > 0, "cpus_per_task", self.cpus_per_task, "must be positive")
        endpoint = self.s3_endpoint_url
        check(
            endpoint is None or endpoint.startswith(("http://", "https://")),
            "s3_endpoint_url",
            endpoint,
            "must be an http(s):// URL",
        )
        check(
            endpoint is None or "@" not in endpoint,
            "s3_endpoint_url",
            "<redacted>",
            "must hold only the endpoint URL, never credentials",
        )
