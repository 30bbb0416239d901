"""Sources: the layouts of data users already have, listed into labelled items (no image is opened here).

``SOURCES`` maps a kind to a lister ``(location, splits) -> SourceListing``:

- ``coco``: ``<root>/<split><year>/`` + ``<root>/annotations/instances_<split><year>.json`` (and, when present,
  ``captions_<split><year>.json``). Label = category of the image's **largest object** (by annotation area;
  non-crowd boxes win over crowd ones, ties go to the lower annotation id), so a single-label classifier sees
  the dominant object; labels index the categories sorted by COCO id (80 labels for COCO 2017). Images without
  annotations get label -1 and an empty class name; their captions are kept.
- ``imagenet``: ``<root>/train/<wnid>/*`` and ``<root>/val/``. Labels index the sorted wnids (the usual 0-999
  order). Validation is either class folders ``val/<wnid>/*`` or a flat ``val/`` labelled by Kaggle's
  ``LOC_val_solution.csv`` (first wnid of each row) or a ``val_labels.txt`` with ``<file name> <wnid>`` lines.
  (The devkit's ``ILSVRC2012_validation_ground_truth.txt`` uses devkit ids, not wnids, and is not read.) Class
  names are the first name in ``LOC_synset_mapping.txt`` / ``synset_words.txt`` when present, else the wnid.
- ``image_folder``: ``<root>/<class>/<image>`` (one split, "train"), or ``<root>/<split>/<class>/<image>`` when
  every folder of the root is a split name (train, val, validation, test). Labels index the sorted class names.
- ``nights``, ``bapps``: 2AFC triplets (a reference and two candidates with the human judgement), see
  :mod:`robustfm.data.sources_2afc`.
- ``revisitop``: Revisited Oxford / Paris (``jpg/`` + ``gnd_<name>.pkl``), splits ``database`` and ``query``, see
  :mod:`robustfm.data.sources_retrieval`.

Hidden files (``.DS_Store``) are ignored; every other file becomes an item, so non-images are reported as
skipped by the converter instead of vanishing.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from robustfm.data.columns import ColumnSpec
from robustfm.data.shards import Location, exists, read_bytes
from robustfm.registry import Registry

SOURCES: Registry = Registry("data source")
SPLIT_FOLDER_NAMES = ("train", "val", "validation", "test")


class LayoutError(ValueError):
    """A root that does not exist or does not look like the chosen source. The message says what was expected."""


@dataclass(frozen=True)
class SourceItem:
    """One file to convert."""

    id: str
    """Stable sample id: the path relative to the root (per-sample seeds derive from it)."""
    path: str
    """Path relative to the root, posix separators."""
    label: int
    class_name: str
    captions: tuple[str, ...] = ()
    extra: tuple[tuple[str, str | float | int], ...] = ()
    """Values of the listing's extra columns (``SourceListing.columns``), as (name, value) pairs: for ``image`` and
    ``mask`` columns a path relative to the root (the converter reads and checks the file), else the value."""


@dataclass
class SourceListing:
    """Everything a source found, before any image is opened."""

    kind: str
    root: str
    classes: tuple[str, ...]
    """Class names in label order."""
    class_ids: tuple[str, ...]
    """Source ids of the classes in label order (wnids, COCO category ids, folder names)."""
    splits: dict[str, list[SourceItem]] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    """Files dropped while listing: ``{"split", "path", "reason", "detail"}``."""
    columns: dict[str, ColumnSpec] = field(default_factory=dict)
    """Extra (schema-v2) columns every item provides through ``SourceItem.extra``: 2AFC triplets' ``left`` and
    ``right`` images, group keys, judgements. The three built-in layouts have none."""

    def skip(self, split: str, path: str, reason: str, detail: str) -> None:
        """Record a file dropped while listing (``reason`` is a short code, ``detail`` says why in words)."""
        self.skipped.append({"split": split, "path": path, "reason": reason, "detail": detail})


def _info(fs: pafs.FileSystem, path: str) -> pafs.FileInfo:
    return fs.get_file_info(path)


def _is_dir(fs: pafs.FileSystem, path: str) -> bool:
    return _info(fs, path).type == pafs.FileType.Directory


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _children(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted((i for i in infos if not _hidden(i.base_name)), key=lambda i: i.base_name)


def _files_below(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = [
        i for i in infos if i.type == pafs.FileType.File and not any(_hidden(p) for p in _rel(i.path, path).split("/"))
    ]
    return sorted(files, key=lambda i: i.path)


def _rel(path: str, base: str) -> str:
    return posixpath.relpath(path.replace("\\", "/"), base.replace("\\", "/"))


def _require_root(location: Location, expected: str) -> pafs.FileSystem:
    fs = location.filesystem()
    if not _is_dir(fs, location.base):
        raise LayoutError(f"data root {location.display()} does not exist or is not a directory; expected {expected}")
    return fs


def _select_splits(found: Sequence[str], wanted: Sequence[str], location: Location, expected: str) -> list[str]:
    if not found:
        raise LayoutError(f"{location.display()} matches no {expected.split(':')[0]} layout; expected {expected}")
    missing = [s for s in wanted if s not in found]
    if missing:
        raise LayoutError(f"{location.display()} has no split {missing} (found {list(found)}); expected {expected}")
    return list(wanted) if wanted else list(found)


# --- COCO --------------------------------------------------------------------------------------------------------

_COCO_INSTANCES = re.compile(r"^instances_([a-z]+)(\d{4})\.json$")


@SOURCES.register("coco", expected="<root>/train2017/ and <root>/annotations/instances_train2017.json")
def list_coco(location: Location, splits: Sequence[str] = ()) -> SourceListing:
    """List a COCO tree (see the module docstring for the label rule)."""
    expected = (
        f"coco: {location.display('train2017')} and {location.display('annotations', 'instances_train2017.json')} "
        "(and/or val2017 with instances_val2017.json)"
    )
    fs = _require_root(location, expected)
    folders: dict[str, str] = {}  # split -> "<split><year>"
    if _is_dir(fs, location.join("annotations")):
        for info in _children(fs, location.join("annotations")):
            match = _COCO_INSTANCES.match(info.base_name)
            if match and _is_dir(fs, location.join(match.group(1) + match.group(2))):
                folders.setdefault(match.group(1), match.group(1) + match.group(2))
    chosen = _select_splits(sorted(folders), splits, location, expected)
    categories: dict[int, str] | None = None
    listing = SourceListing("coco", location.canonical, (), ())
    for split in chosen:
        folder = folders[split]
        instances = json.loads(read_bytes(fs, location.join("annotations", f"instances_{folder}.json")))
        split_categories = {int(c["id"]): str(c["name"]) for c in instances.get("categories", [])}
        categories = categories or split_categories
        order = sorted(categories)
        label_of = {cid: i for i, cid in enumerate(order)}
        best: dict[int, tuple[int, float, int, int]] = {}  # image id -> (not crowd, area, -ann id, category)
        for ann in instances.get("annotations", []):
            key = (
                int(not ann.get("iscrowd", 0)),
                float(ann.get("area", 0.0)),
                -int(ann["id"]),
                int(ann["category_id"]),
            )
            image_id = int(ann["image_id"])
            if image_id not in best or key > best[image_id]:
                best[image_id] = key
        captions: dict[int, list[str]] = {}
        captions_path = location.join("annotations", f"captions_{folder}.json")
        if exists(fs, captions_path):
            for ann in json.loads(read_bytes(fs, captions_path)).get("annotations", []):
                captions.setdefault(int(ann["image_id"]), []).append(str(ann["caption"]).strip())
        present = {i.base_name for i in _children(fs, location.join(folder))}
        items = []
        for image in sorted(instances.get("images", []), key=lambda im: im["file_name"]):
            rel = f"{folder}/{image['file_name']}"
            if image["file_name"] not in present:
                listing.skip(split, rel, "missing_file", f"listed in instances_{folder}.json but not in {folder}/")
                continue
            image_id = int(image["id"])
            category = best[image_id][3] if image_id in best else None
            label = label_of.get(category, -1) if category is not None else -1
            name = categories.get(category, "") if category is not None else ""
            items.append(SourceItem(rel, rel, label, name, tuple(captions.get(image_id, ()))))
        listing.splits[split] = items
    assert categories is not None
    order = sorted(categories)
    listing.classes = tuple(categories[c] for c in order)
    listing.class_ids = tuple(str(c) for c in order)
    return listing


# --- ImageNet ----------------------------------------------------------------------------------------------------


def _synset_names(fs: pafs.FileSystem, location: Location) -> dict[str, str]:
    for name in ("LOC_synset_mapping.txt", "synset_words.txt"):
        path = location.join(name)
        if exists(fs, path):
            names = {}
            for line in read_bytes(fs, path).decode("utf-8").splitlines():
                wnid, _, words = line.strip().partition(" ")
                if wnid:
                    names[wnid] = words.split(",")[0].strip() or wnid
            return names
    return {}


def _flat_val_labels(fs: pafs.FileSystem, location: Location) -> dict[str, str] | None:
    """Stem of a validation file -> wnid, from Kaggle's CSV or a two-column text file; None when neither exists."""
    for path in (location.join("LOC_val_solution.csv"), location.join("val", "LOC_val_solution.csv")):
        if exists(fs, path):
            reader = csv.DictReader(io.StringIO(read_bytes(fs, path).decode("utf-8")))
            return {
                row["ImageId"].strip(): row["PredictionString"].split()[0]
                for row in reader
                if row.get("PredictionString")
            }
    for path in (location.join("val_labels.txt"), location.join("val", "val_labels.txt")):
        if exists(fs, path):
            labels = {}
            for line in read_bytes(fs, path).decode("utf-8").splitlines():
                parts = line.split()
                if len(parts) >= 2:
                    labels[posixpath.splitext(parts[0])[0]] = parts[1]
            return labels
    return None


@SOURCES.register("imagenet", expected="<root>/train/<wnid>/*.JPEG and/or <root>/val/ with its labels")
def list_imagenet(location: Location, splits: Sequence[str] = ()) -> SourceListing:
    """List an ImageNet (ILSVRC-2012) tree (see the module docstring for the validation layouts)."""
    expected = (
        f"imagenet: {location.display('train')}/<wnid>/*.JPEG and/or {location.display('val')}/ "
        "(val/<wnid>/ folders, or flat with LOC_val_solution.csv or val_labels.txt)"
    )
    fs = _require_root(location, expected)
    found = [s for s in ("train", "val") if _is_dir(fs, location.join(s))]
    chosen = _select_splits(found, splits, location, expected)
    names = _synset_names(fs, location)
    train_dirs = (
        [i.base_name for i in _children(fs, location.join("train")) if i.type == pafs.FileType.Directory]
        if "train" in found
        else []
    )
    val_children = _children(fs, location.join("val")) if "val" in found else []
    val_dirs = [i.base_name for i in val_children if i.type == pafs.FileType.Directory]
    wnids = sorted(train_dirs or names or val_dirs)
    if not wnids:
        raise LayoutError(f"{location.display()} has no class folders; expected {expected}")
    label_of = {w: i for i, w in enumerate(wnids)}
    listing = SourceListing("imagenet", location.canonical, tuple(names.get(w, w) for w in wnids), tuple(wnids))

    def item(rel: str, wnid: str, split: str) -> SourceItem | None:
        if wnid not in label_of:
            listing.skip(split, rel, "unknown_class", f"{wnid!r} is not one of the {len(wnids)} training classes")
            return None
        return SourceItem(rel, rel, label_of[wnid], names.get(wnid, wnid))

    for split in chosen:
        items: list[SourceItem | None] = []
        if split == "train" or val_dirs:
            base = location.join(split)
            for info in _files_below(fs, base):
                rel = _rel(info.path, location.base)
                parts = rel.split("/")
                if len(parts) < 3:
                    listing.skip(split, rel, "not_in_class_folder", f"expected {split}/<wnid>/<image>")
                    continue
                items.append(item(rel, parts[1], split))
        else:
            labels = _flat_val_labels(fs, location)
            if labels is None:
                raise LayoutError(
                    f"{location.display('val')} is flat but has no labels: expected "
                    f"{location.display('LOC_val_solution.csv')} or {location.display('val_labels.txt')} "
                    "('<file> <wnid>' lines), or class folders val/<wnid>/"
                )
            for info in _files_below(fs, location.join("val")):
                rel = _rel(info.path, location.base)
                stem = posixpath.splitext(info.base_name)[0]
                if info.base_name in ("LOC_val_solution.csv", "val_labels.txt"):
                    continue
                if stem not in labels:
                    listing.skip(split, rel, "no_label", "not listed in the validation labels file")
                    continue
                items.append(item(rel, labels[stem], split))
        listing.splits[split] = [i for i in items if i is not None]
    return listing


# --- image folder ------------------------------------------------------------------------------------------------


@SOURCES.register("image_folder", expected="<root>/<class>/<image> or <root>/<split>/<class>/<image>")
def list_image_folder(location: Location, splits: Sequence[str] = ()) -> SourceListing:
    """List ``<root>/[<split>/]<class>/<image>`` trees."""
    expected = f"image_folder: {location.display()}/<class>/<image> or {location.display()}/<split>/<class>/<image>"
    fs = _require_root(location, expected)
    top = [i for i in _children(fs, location.base) if i.type == pafs.FileType.Directory]
    split_layout = bool(top) and all(i.base_name in SPLIT_FOLDER_NAMES for i in top)
    split_bases = {i.base_name: location.join(i.base_name) for i in top} if split_layout else {"train": location.base}
    chosen = _select_splits(sorted(split_bases) if top else [], splits, location, expected)
    listing = SourceListing("image_folder", location.canonical, (), ())
    per_split: dict[str, list[tuple[str, str]]] = {}
    class_names: set[str] = set()
    for split in chosen:
        entries = []
        for info in _files_below(fs, split_bases[split]):
            rel = _rel(info.path, location.base)
            inside = _rel(info.path, split_bases[split]).split("/")
            if len(inside) < 2:
                listing.skip(split, rel, "not_in_class_folder", "expected <class>/<image>")
                continue
            entries.append((rel, inside[0]))
            class_names.add(inside[0])
        per_split[split] = entries
    if not class_names:
        raise LayoutError(f"{location.display()} has no class folders with files; expected {expected}")
    classes = tuple(sorted(class_names))
    label_of = {c: i for i, c in enumerate(classes)}
    listing.classes = listing.class_ids = classes
    for split, entries in per_split.items():
        listing.splits[split] = [SourceItem(rel, rel, label_of[c], c) for rel, c in entries]
    return listing


# 2AFC triplets (perceptual similarity), in their own module: a row there is a reference and two candidates.
SOURCES.register_lazy(
    "nights",
    "robustfm.data.sources_2afc:list_nights",
    expected="<root>/data.csv (id, right_vote, ref_path, left_path, right_path, split, is_imagenet, votes)",
)
SOURCES.register_lazy(
    "bapps", "robustfm.data.sources_2afc:list_bapps", expected="<root>/2afc/<split>/<subset>/{ref,p0,p1,judge}/"
)
SOURCES.register_lazy(
    "revisitop",
    "robustfm.data.sources_retrieval:list_revisitop",
    expected="<root>/jpg/<image>.jpg and <root>/gnd_<name>.pkl (Revisited Oxford / Paris)",
)
