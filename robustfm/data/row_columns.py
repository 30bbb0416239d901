"""What the converter reads for a row besides its image: the mirrored mask and the listing's extra columns.

Every problem becomes a :class:`RowSkipped` with a :class:`~robustfm.data.images.SkipReason` code, which the
converter records in the manifest instead of storing a wrong or empty value.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from robustfm.data.columns import ColumnKind, ColumnSpec
from robustfm.data.images import ImageDecodeError, SkipReason, inspect_image
from robustfm.data.masks import inspect_mask
from robustfm.data.shards import read_bytes
from robustfm.data.sources import SourceItem


@dataclass(frozen=True)
class MaskTree:
    """Where the masks are (a pyarrow file system and the tree's base path in it)."""

    filesystem: pafs.FileSystem
    base: str


def mask_candidates(path: str, split: str) -> list[str]:
    """Paths (relative to the mask tree) where the mask of the image at ``path`` may be, in order of preference:
    the mirrored path with a ``.png`` suffix, then the same without the split folder."""
    candidates = [posixpath.splitext(path)[0] + ".png"]
    head, _, rest = path.partition("/")
    if rest and head == split:
        candidates.append(posixpath.splitext(rest)[0] + ".png")
    return candidates


class RowSkipped(Exception):
    """A row that cannot be converted; ``reason`` is a :class:`SkipReason` code for the manifest."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail


def read_source(fs: pafs.FileSystem, base: str, path: str) -> bytes:
    """The bytes of ``base/path``; a storage error becomes an ``unreadable`` skip."""
    try:
        return read_bytes(fs, f"{base.rstrip('/')}/{path}")
    except OSError as err:
        raise RowSkipped(SkipReason.UNREADABLE, str(err)) from None


def listed_values(
    fs: pafs.FileSystem, base: str, item: SourceItem, extra: dict[str, ColumnSpec], width: int, height: int
) -> dict[str, Any]:
    """The stored values of the listing's extra columns for ``item``: images and masks read and checked (masks
    against the image's ``width`` x ``height``), numbers and keys converted to their kind's type.

    Raises:
        RowSkipped: for an undecodable image or mask, or a mask of another size.
        ValueError: when the source's item lacks a value for one of its listing's columns (a bug of the source).
    """
    given = dict(item.extra)
    values: dict[str, Any] = {}
    for name, spec in extra.items():
        if name not in given:
            raise ValueError(f"source item {item.path!r} has no value for its listing's column {name!r}")
        value = given[name]
        if spec.kind in (ColumnKind.IMAGE, ColumnKind.MASK):
            data = read_source(fs, base, str(value))
            try:
                if spec.kind == ColumnKind.IMAGE:
                    values[name] = inspect_image(data, str(value)).data
                    continue
                mask = inspect_mask(data, str(value))
            except ImageDecodeError as err:
                raise RowSkipped(err.reason, f"column {name!r}: {err.detail}") from None
            if (mask.width, mask.height) != (width, height):
                raise RowSkipped(
                    SkipReason.MASK_SIZE_MISMATCH,
                    f"column {name!r}: mask {value} is {mask.width}x{mask.height}, the image {width}x{height}",
                )
            values[name] = mask.data
        elif spec.kind == ColumnKind.FLOAT:
            values[name] = float(value)
        elif spec.kind == ColumnKind.INT:
            values[name] = int(value)
        else:
            values[name] = str(value)
    return values
