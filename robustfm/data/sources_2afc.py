"""2AFC perceptual-similarity layouts (NIGHTS, BAPPS) listed as triplets: one row = a reference image (``image``), two
candidates (``left``, ``right``) and ``p_right``, the share of human judges who found the right candidate closer to
the reference. ``class_name`` names the row's subset (its ``label`` indexes the sorted subsets), so a suite can report
per subset and over them.

- ``nights``: ``<root>/data.csv`` with the named columns ``id, right_vote, ref_path, left_path, right_path, split,
  is_imagenet, votes`` (paths relative to the root: ``ref/XXX/YYY.png``, ``distort/XXX/YYY_0.png`` = left,
  ``YYY_1.png`` = right). Only unanimous triplets are kept (``votes >= 6``, as DreamSim and perceptual-metrics
  evaluate); the others are listed as skipped (``votes_below_6``). Splits: ``train``, ``val``, ``test``; subsets
  ``imagenet`` / ``no_imagenet`` (``is_imagenet``), so one ``test`` split gives the whole test set and both of its
  parts (paper 003 reports all three). ``p_right`` = ``right_vote`` (0 or 1: the votes were unanimous).
- ``bapps``: ``<root>/2afc/<split>/<subset>/{ref,p0,p1}/<stem>.png`` and ``judge/<stem>.npy`` (share preferring
  ``p1``); ``p0`` is ``left``. Files are paired **by stem**, never by sorted position (a missing file would shift
  every later pair); a stem missing from any of the four folders is skipped and named (``unpaired``). Splits
  ``train`` (subsets cnn, mix, traditional) and ``val`` (cnn, color, deblur, frameinterp, superres, traditional).

Missing or corrupt image files are found by the converter (skipped and named like any unreadable image).
"""

from __future__ import annotations

import csv
import io
import posixpath
from collections.abc import Sequence

import numpy as np
import pyarrow.fs as pafs

from robustfm.data.columns import ColumnKind, ColumnSpec
from robustfm.data.shards import Location, exists, read_bytes
from robustfm.data.sources import (
    LayoutError,
    SourceItem,
    SourceListing,
    _children,
    _is_dir,
    _rel,
    _require_root,
    _select_splits,
)

TRIPLET_COLUMNS = {
    "left": ColumnSpec(ColumnKind.IMAGE, "the first candidate (NIGHTS _0, BAPPS p0)"),
    "right": ColumnSpec(ColumnKind.IMAGE, "the second candidate (NIGHTS _1, BAPPS p1)"),
    "p_right": ColumnSpec(ColumnKind.FLOAT, "share of human judges who found the right candidate closer"),
}
NIGHTS_COLUMNS = ("id", "right_vote", "ref_path", "left_path", "right_path", "split", "is_imagenet", "votes")
NIGHTS_MIN_VOTES = 6
NIGHTS_SUBSETS = ("imagenet", "no_imagenet")
BAPPS_SUBSETS = {
    "train": ("cnn", "mix", "traditional"),
    "val": ("cnn", "color", "deblur", "frameinterp", "superres", "traditional"),
}
BAPPS_FOLDERS = ("ref", "p0", "p1", "judge")


def list_nights(location: Location, splits: Sequence[str] = ()) -> SourceListing:
    """List NIGHTS' unanimous triplets (see the module docstring)."""
    expected = f"nights: {location.display('data.csv')} with columns {', '.join(NIGHTS_COLUMNS)}"
    fs = _require_root(location, expected)
    table = location.join("data.csv")
    if not exists(fs, table):
        raise LayoutError(f"{location.display('data.csv')} does not exist; expected {expected}")
    reader = csv.DictReader(io.StringIO(read_bytes(fs, table).decode("utf-8")))
    missing = [name for name in NIGHTS_COLUMNS if name not in (reader.fieldnames or [])]
    if missing:
        found_columns = reader.fieldnames or []
        raise LayoutError(
            f"{location.display('data.csv')} lacks the column(s) {missing} (has {found_columns}); expected {expected}"
        )
    rows = list(reader)
    found = sorted({row["split"] for row in rows})
    chosen = _select_splits(found, splits, location, expected)
    listing = SourceListing("nights", location.canonical, NIGHTS_SUBSETS, NIGHTS_SUBSETS, columns=TRIPLET_COLUMNS)
    listing.splits = {split: [] for split in chosen}
    for line, row in enumerate(rows, start=2):
        split = row["split"]
        if split not in listing.splits:
            continue
        where = f"data.csv line {line} (id {row['id']})"
        try:
            votes, right_vote = int(row["votes"]), int(row["right_vote"])
            imagenet = _flag(row["is_imagenet"])
        except ValueError as err:
            listing.skip(split, row["ref_path"], "bad_row", f"{where}: {err}")
            continue
        if votes < NIGHTS_MIN_VOTES:
            listing.skip(split, row["ref_path"], f"votes_below_{NIGHTS_MIN_VOTES}", f"{where}: {votes} votes")
            continue
        if right_vote not in (0, 1):
            listing.skip(split, row["ref_path"], "bad_row", f"{where}: right_vote must be 0 or 1, got {right_vote}")
            continue
        subset = NIGHTS_SUBSETS[0] if imagenet else NIGHTS_SUBSETS[1]
        extra = (("left", row["left_path"]), ("right", row["right_path"]), ("p_right", float(right_vote)))
        item = SourceItem(row["id"], row["ref_path"], NIGHTS_SUBSETS.index(subset), subset, extra=extra)
        listing.splits[split].append(item)
    return listing


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise ValueError(f"is_imagenet must be true or false, got {text!r}")


def list_bapps(location: Location, splits: Sequence[str] = ()) -> SourceListing:
    """List BAPPS' 2AFC triplets, paired by file stem (see the module docstring)."""
    expected = f"bapps: {location.display('2afc', '<split>', '<subset>', '{ref,p0,p1,judge}')}"
    fs = _require_root(location, expected)
    base = location.join("2afc")
    if not _is_dir(fs, base):
        raise LayoutError(f"{location.display('2afc')} does not exist; expected {expected}")
    found = [i.base_name for i in _children(fs, base) if i.type == pafs.FileType.Directory]
    unknown = [name for name in found if name not in BAPPS_SUBSETS]
    if unknown:
        raise LayoutError(f"{location.display('2afc')} has unknown split folder(s) {unknown}; expected {expected}")
    chosen = _select_splits(found, splits, location, expected)
    subsets = sorted({s for split in chosen for s in _subsets(fs, location, split, expected)})
    listing = SourceListing("bapps", location.canonical, tuple(subsets), tuple(subsets), columns=TRIPLET_COLUMNS)
    for split in chosen:
        items: list[SourceItem] = []
        for subset in _subsets(fs, location, split, expected):
            items += _bapps_subset(fs, location, split, subset, subsets.index(subset), listing)
        listing.splits[split] = items
    return listing


def _subsets(fs: pafs.FileSystem, location: Location, split: str, expected: str) -> list[str]:
    """The subset folders of a split, each checked to be a known subset with all four folders."""
    split_dir = location.join("2afc", split)
    names = [i.base_name for i in _children(fs, split_dir) if i.type == pafs.FileType.Directory]
    unknown = [name for name in names if name not in BAPPS_SUBSETS[split]]
    if unknown:
        raise LayoutError(
            f"{location.display('2afc', split)} has unknown subset folder(s) {unknown} "
            f"(BAPPS {split} has {list(BAPPS_SUBSETS[split])}); expected {expected}"
        )
    for name in names:
        lacking = [f for f in BAPPS_FOLDERS if not _is_dir(fs, location.join("2afc", split, name, f))]
        if lacking:
            where = location.display("2afc", split, name)
            raise LayoutError(f"{where} lacks the folder(s) {lacking}; expected {expected}")
    if not names:
        raise LayoutError(f"{location.display('2afc', split)} has no subset folders; expected {expected}")
    return sorted(names)


def _bapps_subset(
    fs: pafs.FileSystem, location: Location, split: str, subset: str, label: int, listing: SourceListing
) -> list[SourceItem]:
    folder = location.join("2afc", split, subset)
    files = {name: _by_stem(fs, f"{folder}/{name}", location.base) for name in BAPPS_FOLDERS}
    stems = sorted(set().union(*files.values()))
    items = []
    for stem in stems:
        lacking = [name for name in BAPPS_FOLDERS if stem not in files[name]]
        if lacking:
            present = next(files[name][stem] for name in BAPPS_FOLDERS if stem in files[name])
            listing.skip(split, present, "unpaired", f"stem {stem!r} of {split}/{subset} has no file in {lacking}")
            continue
        judge_path = files["judge"][stem]
        try:
            p_right = _judgement(read_bytes(fs, location.join(judge_path)))
        except (OSError, ValueError) as err:
            listing.skip(split, judge_path, "bad_judgement", str(err))
            continue
        extra = (("left", files["p0"][stem]), ("right", files["p1"][stem]), ("p_right", p_right))
        item_id = f"{split}/{subset}/{stem}"
        items.append(SourceItem(item_id, files["ref"][stem], label, subset, extra=extra))
    return items


def _by_stem(fs: pafs.FileSystem, folder: str, root: str) -> dict[str, str]:
    """File stem -> path relative to the root, of the files in ``folder``."""
    return {posixpath.splitext(i.base_name)[0]: _rel(i.path, root) for i in _children(fs, folder)}


def _judgement(data: bytes) -> float:
    """The share of judges preferring p1 from a ``judge/<stem>.npy`` file (one number in [0, 1]; no pickles)."""
    value = np.load(io.BytesIO(data), allow_pickle=False)
    if value.size != 1:
        raise ValueError(f"expected one number, got an array of shape {value.shape}")
    share = float(value.reshape(-1)[0])
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"expected a share in [0, 1], got {share}")
    return share
