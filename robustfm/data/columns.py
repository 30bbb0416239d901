"""The columns of the shard format: base columns, the kinds an extra (schema-v2) column may have, and the Parquet
schema of a shard.

Schema version 1 has the :data:`BASE_COLUMNS` only. Version 2 adds optional extra columns, each declared with a kind
(:class:`ColumnKind`) and a meaning (:class:`ColumnSpec`) in the manifest's ``columns`` section and in every shard
file's schema metadata.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

import pyarrow as pa

SCHEMA_VERSION = 2
BASE_COLUMNS = ("id", "image", "label", "class_name", "captions", "source_path", "width", "height", "row")


class ColumnKind:
    """What a column holds. The first five kinds are those of the base columns; the last five may be declared."""

    ID = "id"
    """The sample id (str)."""
    TEXT = "text"
    """A string (class name, source path)."""
    TEXTS = "texts"
    """A list of strings (captions)."""
    INT = "int"
    """An integer (int64; labels, sizes)."""
    IMAGE = "image"
    """Encoded image bytes (JPEG/PNG/WebP) that decode to upright 8-bit RGB."""
    MASK = "mask"
    """A per-image mask: an 8-bit single-channel PNG of the row's ``image`` size; values are kept exactly (0/255
    foreground mattes, concept or class indices) and decode to uint8 [1, S, S]."""
    GROUP = "group"
    """A string key tying rows into pairs or groups (e.g. the two halves of a pair share it)."""
    FLOAT = "float"
    """A number (float64), e.g. a human judgement."""


DECLARABLE_KINDS = (ColumnKind.IMAGE, ColumnKind.MASK, ColumnKind.GROUP, ColumnKind.FLOAT, ColumnKind.INT)
"""Kinds an extra (schema-v2) column may have."""
DECODED_KINDS = (ColumnKind.IMAGE, ColumnKind.MASK)
"""Kinds the readers decode into pixels (with one joint geometric transform per row)."""
_ARROW_TYPES = {
    ColumnKind.ID: pa.string(),
    ColumnKind.TEXT: pa.string(),
    ColumnKind.TEXTS: pa.list_(pa.string()),
    ColumnKind.INT: pa.int64(),
    ColumnKind.IMAGE: pa.binary(),
    ColumnKind.MASK: pa.binary(),
    ColumnKind.GROUP: pa.string(),
    ColumnKind.FLOAT: pa.float64(),
}
_COLUMN_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class ColumnSpec:
    """One column of a shard set: its kind (a :class:`ColumnKind` value) and what it means."""

    kind: str
    meaning: str = ""

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "meaning": self.meaning}


BASE_SPECS: dict[str, ColumnSpec] = {
    "id": ColumnSpec(ColumnKind.ID, "stable sample id: the source path relative to the root"),
    "image": ColumnSpec(ColumnKind.IMAGE, "the image, encoded (decodes to upright 8-bit RGB)"),
    "label": ColumnSpec(ColumnKind.INT, "class index into the manifest's classes (-1: none)"),
    "class_name": ColumnSpec(ColumnKind.TEXT, "name of the class"),
    "captions": ColumnSpec(ColumnKind.TEXTS, "captions (may be empty)"),
    "source_path": ColumnSpec(ColumnKind.TEXT, "path of the original file relative to the source root"),
    "width": ColumnSpec(ColumnKind.INT, "width of the upright image"),
    "height": ColumnSpec(ColumnKind.INT, "height of the upright image"),
    "row": ColumnSpec(ColumnKind.INT, "position of the row inside its shard"),
}
_BASE_TYPES = {"width": pa.int32(), "height": pa.int32(), "row": pa.int32()}  # v1 stored these as int32


def check_extra_columns(extra: Mapping[str, ColumnSpec]) -> dict[str, ColumnSpec]:
    """Validate extra column declarations (names and kinds) and return them as a dict.

    Raises:
        ValueError: naming the column: a base column name, a name that is not lower_snake_case, or a kind that
            cannot be declared.
    """
    checked = {}
    for name, spec in extra.items():
        if name in BASE_SPECS:
            raise ValueError(f"extra column {name!r} clashes with a base column ({', '.join(BASE_COLUMNS)})")
        if not _COLUMN_NAME.match(name):
            raise ValueError(f"extra column name {name!r} must be lower_snake_case (letters, digits, underscores)")
        if spec.kind not in DECLARABLE_KINDS:
            raise ValueError(f"extra column {name!r}: kind {spec.kind!r} is not one of {', '.join(DECLARABLE_KINDS)}")
        checked[name] = spec
    return checked


def shard_schema(extra: Mapping[str, ColumnSpec] | None = None) -> pa.Schema:
    """The Parquet schema of a shard: the base columns, then ``extra`` columns in the given order.

    ``row`` (the row's position inside its shard) is an addition to the interface: with the manifest's row
    counts it gives every sample a global index, which makes seeded shuffles and rank shares exact. The schema
    metadata carries the schema version and the column declarations, so a lone shard file describes itself.
    """
    extra = check_extra_columns(extra or {})
    fields = [
        pa.field(name, _BASE_TYPES.get(name, _ARROW_TYPES[spec.kind]), nullable=False)
        for name, spec in BASE_SPECS.items()
    ]
    fields += [pa.field(name, _ARROW_TYPES[spec.kind], nullable=False) for name, spec in extra.items()]
    declared = {name: spec.to_json() for name, spec in {**BASE_SPECS, **extra}.items()}
    return pa.schema(
        fields,
        metadata={"robustfm.schema_version": str(SCHEMA_VERSION), "robustfm.columns": json.dumps(declared)},
    )


def extra_columns(columns: Mapping[str, ColumnSpec]) -> dict[str, ColumnSpec]:
    """The schema-v2 extra columns among ``columns`` (everything but the base columns)."""
    return {name: spec for name, spec in columns.items() if name not in BASE_SPECS}
