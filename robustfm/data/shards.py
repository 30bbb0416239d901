"""The shard format: Parquet files of encoded images plus a ``manifest.json``, on local disk or S3.

Layout under an output directory (local path or ``s3://bucket/prefix``)::

    manifest.json                      counts, classes, columns, skipped files, source, schema version, checksums
    train/shard-00000.parquet ...      one row per image (see :func:`shard_schema`)
    val/shard-00000.parquet ...
    _done/train-shard-00000.json ...   one record per finished shard: what the converter needs to resume

Every file is written atomically (:func:`write_bytes_atomic`): readers never see half a shard or half a manifest.

Schema versions: 1 has the :data:`BASE_COLUMNS` only. 2 adds optional extra columns, declared in the manifest's
``columns`` section (name -> ``{"kind", "meaning"}``, see :class:`ColumnSpec`): per-image masks, group keys tying
rows into pairs, further encoded images (the two distortions of a 2AFC triplet) and numeric labels. A version-1
manifest has a plain list of column names there; :func:`manifest_columns` reads both, so v1 shard sets stay readable
everywhere.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import posixpath
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from robustfm.data.columns import BASE_COLUMNS as BASE_COLUMNS
from robustfm.data.columns import BASE_SPECS as BASE_SPECS
from robustfm.data.columns import DECLARABLE_KINDS as DECLARABLE_KINDS
from robustfm.data.columns import DECODED_KINDS as DECODED_KINDS
from robustfm.data.columns import SCHEMA_VERSION as SCHEMA_VERSION
from robustfm.data.columns import ColumnKind as ColumnKind
from robustfm.data.columns import ColumnSpec as ColumnSpec
from robustfm.data.columns import check_extra_columns as check_extra_columns
from robustfm.data.columns import extra_columns as extra_columns
from robustfm.data.columns import shard_schema as shard_schema

MANIFEST_NAME = "manifest.json"
DONE_DIR = "_done"


def shard_name(index: int) -> str:
    """File name of shard ``index`` inside its split folder."""
    return f"shard-{index:05d}.parquet"


def done_record_name(split: str, index: int) -> str:
    """Path (relative to the output) of the done record of one shard."""
    return f"{DONE_DIR}/{split}-shard-{index:05d}.json"


# --- file systems ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """A local directory or S3 prefix (no credentials inside: it goes into configs, logs and manifests)."""

    uri: str
    endpoint_url: str | None = None

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    @property
    def canonical(self) -> str:
        """``s3://...`` as given, or the absolute local path (what manifests record)."""
        return self.uri if self.is_s3 else self.base

    @property
    def base(self) -> str:
        """The path inside the file system: an absolute local path, or ``bucket/prefix``."""
        if self.is_s3:
            return self.uri[len("s3://") :].rstrip("/")
        return os.path.abspath(os.path.expanduser(self.uri))

    def resolved_endpoint(self) -> str | None:
        """The S3 endpoint URL: the configured one, else ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL``."""
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")

    def filesystem(self) -> pafs.FileSystem:
        """A pyarrow file system for this location.

        S3 credentials come from the environment only. When this process has ``AWS_ACCESS_KEY_ID`` /
        ``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_SESSION_TOKEN``) they are set on the file system explicitly, so that Ray
        tasks it is pickled into (our conversion tasks, Ray Data's read tasks) use the driver's credentials even
        when their worker processes were started without them; otherwise each process resolves its own (instance
        role, profile). The file system object is never logged or written anywhere.
        """
        if not self.is_s3:
            return pafs.LocalFileSystem()
        endpoint = self.resolved_endpoint()
        options: dict[str, Any] = {}
        if endpoint:
            parsed = urlparse(endpoint)
            options["endpoint_override"] = parsed.netloc or parsed.path
            options["scheme"] = parsed.scheme or "https"
        # An explicit region avoids pyarrow's region lookup, which contacts AWS (slow or impossible offline).
        if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
            options["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
            options["secret_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
            if os.environ.get("AWS_SESSION_TOKEN"):
                options["session_token"] = os.environ["AWS_SESSION_TOKEN"]
        options["region"] = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return pafs.S3FileSystem(**options)

    def join(self, *parts: str) -> str:
        """A path inside the file system below this location."""
        return posixpath.join(self.base, *parts) if self.is_s3 else os.path.join(self.base, *parts)

    def display(self, *parts: str) -> str:
        """A path for messages (``s3://...`` kept)."""
        return posixpath.join(self.uri.rstrip("/"), *parts) if parts else self.uri


def exists(fs: pafs.FileSystem, path: str) -> bool:
    """True when ``path`` is a file."""
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    """The whole content of a file."""
    with fs.open_input_stream(path) as stream:
        return stream.readall()


def write_bytes_atomic(location: Location, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` (a path inside ``location``'s file system) so no reader sees a partial file.

    Local disks: write a temporary sibling, fsync, then rename over the target (atomic on POSIX). S3: one
    ``PutObject`` of the whole buffer; S3 makes an object visible only once such a request completed, and a failed
    request leaves nothing behind (a multipart upload could be completed with missing parts by a careless close).
    A single PUT takes up to 5 GB, far above any sensible shard.
    """
    if location.is_s3:
        bucket, _, key = path.partition("/")
        _s3_client(location.resolved_endpoint()).put_object(Bucket=bucket, Key=key, Body=data)
        return
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


@functools.lru_cache(maxsize=4)
def _s3_client(endpoint_url: str | None) -> Any:
    import boto3  # credentials: boto3's default chain (environment, profile, instance role)

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region)


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


# --- shards ------------------------------------------------------------------------------------------------------


def encode_shard(rows: Sequence[Mapping[str, Any]], extra: Mapping[str, ColumnSpec] | None = None) -> bytes:
    """Serialize rows (dicts with the schema's columns, ``row`` filled in here) to Parquet bytes.

    Args:
        rows: one dict per image with every base column (but ``row``) and every ``extra`` column.
        extra: the schema-v2 extra columns of the shard set (see :func:`shard_schema`).
    """
    schema = shard_schema(extra)
    columns: dict[str, list[Any]] = {name: [] for name in schema.names}
    for position, row in enumerate(rows):
        for name in schema.names:
            columns[name].append(position if name == "row" else row[name])
    table = pa.Table.from_pydict(columns, schema=schema)
    buffer = io.BytesIO()
    # Encoded images and masks do not compress further; the text columns do.
    binary = {name for name in schema.names if pa.types.is_binary(schema.field(name).type)}
    compression = {name: ("NONE" if name in binary else "ZSTD") for name in schema.names}
    pq.write_table(table, buffer, compression=compression, row_group_size=256)
    return buffer.getvalue()


# --- manifest ----------------------------------------------------------------------------------------------------


class ManifestError(ValueError):
    """A shard directory without a (valid) manifest, or a split it does not have."""


def read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    """Parse a JSON file."""
    return json.loads(read_bytes(fs, path).decode("utf-8"))


def write_json_atomic(location: Location, path: str, data: Mapping[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically."""
    write_bytes_atomic(location, path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def load_manifest(location: Location) -> dict[str, Any]:
    """The manifest of a shard directory.

    Raises:
        ManifestError: naming the directory when there is no manifest or it is of a newer schema version.
    """
    fs = location.filesystem()
    path = location.join(MANIFEST_NAME)
    if not exists(fs, path):
        raise ManifestError(
            f"{location.display(MANIFEST_NAME)} does not exist: {location.uri!r} is not a finished shard directory "
            "(run jobs/prepare_data.py to create it, or rerun it to finish an interrupted conversion)"
        )
    manifest = read_json(fs, path)
    version = manifest.get("schema_version")
    if not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
        raise ManifestError(
            f"{location.display(MANIFEST_NAME)}: schema_version {version!r} is not readable by this robustfm "
            f"(reads versions 1 to {SCHEMA_VERSION})"
        )
    return manifest


def split_shards(manifest: Mapping[str, Any], split: str, where: str = "") -> list[dict[str, Any]]:
    """The shard entries (``file``, ``rows``, ``sha256``, ``bytes``) of ``split``, in shard order."""
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ManifestError(f"{where or 'manifest'} has no split {split!r}; it has {sorted(splits)}")
    return list(splits[split]["shards"])


# --- columns -----------------------------------------------------------------------------------------------------


class MissingColumnError(ManifestError):
    """A shard set that lacks a column a reader needs. The message names the column and the shard directory."""


def manifest_columns(manifest: Mapping[str, Any], where: str = "manifest") -> dict[str, ColumnSpec]:
    """The columns a manifest declares (name -> spec, in file order), for schema version 1 and 2.

    Version 1 manifests list column names only (always the base columns); version 2 manifests map every column to
    its kind and meaning.

    Raises:
        ManifestError: naming ``where`` when the ``columns`` section is malformed or declares an unknown kind.
    """
    declared = manifest.get("columns")
    if manifest.get("schema_version") == 1 or declared is None or isinstance(declared, list):
        return dict(BASE_SPECS)
    if not isinstance(declared, Mapping):
        raise ManifestError(f"{where}: 'columns' must map column names to {{kind, meaning}}, got {declared!r}")
    columns: dict[str, ColumnSpec] = {}
    for name, entry in declared.items():
        if not isinstance(entry, Mapping) or "kind" not in entry:
            raise ManifestError(f"{where}: column {name!r} must be declared as {{kind, meaning}}, got {entry!r}")
        columns[name] = ColumnSpec(str(entry["kind"]), str(entry.get("meaning", "")))
    missing = [name for name in BASE_COLUMNS if name not in columns]
    if missing:
        raise ManifestError(f"{where}: 'columns' lacks base column(s) {missing}")
    try:
        check_extra_columns({n: s for n, s in columns.items() if n not in BASE_SPECS})
    except ValueError as err:
        raise ManifestError(f"{where}: {err}") from None
    return columns


def shard_columns(path: str, endpoint_url: str | None = None) -> dict[str, ColumnSpec]:
    """The columns the shard set at ``path`` provides (name -> :class:`ColumnSpec`), read from its manifest.

    Raises:
        ManifestError: when ``path`` holds no finished conversion.
    """
    location = Location(path, endpoint_url)
    return manifest_columns(load_manifest(location), location.display(MANIFEST_NAME))


def require_columns(
    path: str, needed: Sequence[str], endpoint_url: str | None = None, *, reader: str = "this reader"
) -> dict[str, ColumnSpec]:
    """Check that the shard set at ``path`` has every column of ``needed``; return all its columns.

    Args:
        reader: who needs the columns, for the message (e.g. ``"suite 'mask_consistency'"``).

    Raises:
        MissingColumnError: naming the missing column(s), the shard directory and the columns it has.
    """
    location = Location(path, endpoint_url)
    columns = manifest_columns(load_manifest(location), location.display(MANIFEST_NAME))
    check_columns(columns, needed, location, reader)
    return columns


def check_columns(columns: Mapping[str, ColumnSpec], needed: Sequence[str], location: Location, reader: str) -> None:
    """Raise :class:`MissingColumnError` naming ``reader``, the columns of ``needed`` that the shard set at
    ``location`` (with ``columns``) lacks, and the columns it has."""
    missing = [name for name in needed if name not in columns]
    if missing:
        raise MissingColumnError(
            f"{reader} reads column(s) {missing} that the shards at {location.display()} do not have (they have "
            f"{list(columns)}; masks are added by prepare_data's source.masks option)"
        )


@dataclass(frozen=True)
class SplitListing:
    """One split of a shard directory as its manifest lists it (:func:`list_split`)."""

    location: Location
    shards: list[dict[str, Any]]
    """The split's shard entries (``file``, ``rows``, ``sha256``, ``bytes``), in shard order."""
    manifest: dict[str, Any]

    @functools.cached_property
    def columns(self) -> dict[str, ColumnSpec]:
        """The columns the shard set declares (:func:`manifest_columns`), read on first use."""
        return manifest_columns(self.manifest, self.location.display(MANIFEST_NAME))

    def read_columns(self, wanted: Sequence[str] | None, reader: str) -> dict[str, ColumnSpec]:
        """The specs of ``wanted`` (None: every column), checked with :func:`check_columns`."""
        if wanted is None:
            return dict(self.columns)
        check_columns(self.columns, wanted, self.location, reader)
        return {name: self.columns[name] for name in wanted}

    def read_rows(self, columns: Sequence[str], limit: int | None = None) -> dict[str, list[Any]]:
        """The first ``limit`` rows (None: all) of ``columns``, in shard order, read without Ray (small reads on the
        driver: a background pool, an export of a few samples). Columns are checked first, named when missing."""
        self.read_columns(columns, "this read")
        fs = self.location.filesystem()
        out: dict[str, list[Any]] = {name: [] for name in columns}
        for shard in self.shards:
            if limit is not None and len(out[columns[0]]) >= limit:
                break
            table = pq.read_table(self.location.join(shard["file"]), filesystem=fs, columns=list(columns))
            for name in columns:
                out[name].extend(table.column(name).to_pylist())
        return {name: values[:limit] for name, values in out.items()}


def list_split(location: Location, split: str) -> SplitListing:
    """The manifest's listing of ``split`` at ``location``.

    Raises:
        ManifestError: naming the directory when it holds no finished conversion or has no ``split``.
    """
    manifest = load_manifest(location)
    return SplitListing(location, split_shards(manifest, split, location.display(MANIFEST_NAME)), manifest)
