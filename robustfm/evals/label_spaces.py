"""The classes a classifier chooses among: those present in the data, or all of ImageNet-1k, and how data classes map
onto them.

- ``present``: the classes the evaluated images carry, in label order (the data's ``class_name`` is the prompt).
- ``imagenet1k``: the 1,000 ImageNet classes in their standard order, prompted by their first lemma from
  ``timm.data.ImageNetInfo`` ("tench" for ``n01440764``). A data class maps to ImageNet by its ``class_name``: a
  WordNet id (``n01440764``: ImageNet-A/-R/-Sketch folders), a class index (``"0"`` .. ``"999"``: ImageNet-V2
  folders) or one of the class's lemmas (case-insensitive; a lemma shared by two ImageNet classes, such as "crane",
  must be given as a WordNet id). A class map (:func:`read_class_map`: ObjectNet, SI-Score) instead maps each data
  class to one or more ImageNet classes, the first being its primary one. A class that maps nowhere fails, naming it
  (or, with ``unmapped="skip"``, is left out so that its images are counted as skipped).

Also here, because they name ImageNet classes the same ways: the 200-class logit subsets timm ships
(:func:`logit_subset`) and lists of WordNet ids (:func:`read_wnid_list`: a fine-tuning run's train classes).

``resolve_label_space`` runs on the driver before any actor starts; its result goes to the actors as plain data.
"""

from __future__ import annotations

import csv
import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from robustfm.registry import did_you_mean

LABEL_SPACES = ("present", "imagenet1k")
LOGIT_SUBSETS = ("all", "imagenet_a", "imagenet_r")
_WNID = re.compile(r"^n\d{8}$")
_INDEX = re.compile(r"^\d+$")
_SEPARATOR = ";"


@dataclass(frozen=True)
class LabelSpace:
    """Attributes:
    class_names: the prompt name of each class (logit column ``i`` is ``class_names[i]``).
    index_of: data label -> logit column of its (primary) class.
    all_indices_of: data label -> every logit column its class maps to, the primary one first (several only under a
        class map: an ObjectNet class covering several ImageNet classes).
    unmapped: data class names left out (``unmapped="skip"``): their images have no class here.
    """

    class_names: list[str]
    index_of: dict[int, int]
    all_indices_of: dict[int, list[int]] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ImageNetClasses:
    """ImageNet-1k's names, read once from timm's offline files.

    Attributes:
        wnids: WordNet id of each class index.
        lemmas: the lemmas of each class index (its description split at commas).
        by_wnid: WordNet id -> index.
        by_lemma: lower-case lemma -> the indices that carry it (several for "crane", "maillot").
    """

    wnids: list[str]
    lemmas: list[list[str]]
    by_wnid: dict[str, int]
    by_lemma: dict[str, set[int]]


@functools.cache
def imagenet_classes() -> ImageNetClasses:
    """ImageNet-1k's WordNet ids and lemmas from ``timm.data.ImageNetInfo`` (no download)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    wnids = [info.index_to_label_name(i) for i in range(info.num_classes())]
    lemmas = [[part.strip() for part in info.index_to_description(i).split(",")] for i in range(len(wnids))]
    by_lemma: dict[str, set[int]] = {}
    for index, names in enumerate(lemmas):
        for name in names:
            by_lemma.setdefault(name.lower(), set()).add(index)
    return ImageNetClasses(wnids, lemmas, {wnid: index for index, wnid in enumerate(wnids)}, by_lemma)


def imagenet_index(entry: str | int) -> int:
    """The ImageNet-1k class index of a WordNet id, an index (int or digits) or a lemma held by one class only.

    Raises:
        ValueError: saying why (an unknown wnid with the closest known ones, an index outside 0..999, a lemma of
            several classes with their wnids, or a name that is none of these).
    """
    classes = imagenet_classes()
    count = len(classes.wnids)
    text = str(entry).strip()
    if isinstance(entry, int) or _INDEX.match(text):
        if not 0 <= int(text) < count:
            raise ValueError(f"class index {text} is outside ImageNet-1k's 0..{count - 1}")
        return int(text)
    if _WNID.match(text):
        if text not in classes.by_wnid:
            raise ValueError(f"{text!r} is not an ImageNet-1k wnid{did_you_mean(text, classes.wnids)}")
        return classes.by_wnid[text]
    found = classes.by_lemma.get(text.lower(), set())
    if len(found) == 1:
        return next(iter(found))
    if found:
        ids = ", ".join(sorted(classes.wnids[i] for i in found))
        raise ValueError(f"{text!r} is a lemma of several ImageNet classes ({ids}): use the wnid")
    raise ValueError(f"{text!r} is neither an ImageNet wnid, a class index 0..{count - 1} nor one of its class lemmas")


def resolve_label_space(
    space: str,
    present: Mapping[int, str],
    *,
    class_map: Mapping[str, Sequence[int]] | None = None,
    unmapped: str = "error",
) -> LabelSpace:
    """The label space ``space`` for data whose classes are ``present`` (``{label: class_name}``).

    Args:
        class_map: ``imagenet1k`` only: data class name -> ImageNet indices, primary first (:func:`read_class_map`);
            None maps each class by its own name.
        unmapped: ``error`` (a class that maps nowhere fails) or ``skip`` (it is left out and listed).

    Raises:
        ValueError: an unknown space, or (``imagenet1k``) data classes that name no ImageNet class.
    """
    if space == "present":
        index_of = {label: index for index, label in enumerate(present)}
        return LabelSpace(list(present.values()), index_of, {k: [v] for k, v in index_of.items()})
    if space != "imagenet1k":
        raise ValueError(f"label_space {space!r} is unknown; choose one of {list(LABEL_SPACES)}")
    if unmapped not in ("error", "skip"):
        raise ValueError(f"unmapped {unmapped!r} is unknown; choose 'error' or 'skip'")
    classes = imagenet_classes()
    all_indices_of: dict[int, list[int]] = {}
    problems, skipped = [], []
    for label, name in present.items():
        if class_map is not None:
            found = class_map.get(name.strip())
            if found:
                all_indices_of[label] = [int(i) for i in found]
            elif unmapped == "skip":
                skipped.append(name)
            else:
                close = did_you_mean(name, list(class_map))
                problems.append(f"{name!r} (label {label}) is not in the class map{close}")
            continue
        try:
            all_indices_of[label] = [imagenet_index(name)]
        except ValueError as err:
            ambiguous = "several ImageNet classes" in str(err)
            if unmapped == "skip" and not ambiguous:
                skipped.append(name)
            else:
                problems.append(f"{err} (data class {name!r}, label {label})")
    if problems:
        raise ValueError("label_space imagenet1k: " + "; ".join(problems))
    index_of = {label: indices[0] for label, indices in all_indices_of.items()}
    return LabelSpace([names[0] for names in classes.lemmas], index_of, all_indices_of, sorted(skipped))


def read_class_map(path: str) -> dict[str, list[int]]:
    """A class map file: data class (folder) name -> its ImageNet-1k indices, the primary one first.

    Formats (by suffix): ``.json``, an object ``{"class": entry}`` where an entry is an index, a wnid, a lemma, a
    ``;``-separated string of them (ObjectNet's own mapping file) or a list of them; ``.csv``, a header row then rows
    ``class,entry[,entry...]`` (each cell may hold ``;``-separated entries; repeated rows of a class add entries).
    Entries are resolved by :func:`imagenet_index`; duplicates are dropped, order kept.

    Raises:
        ValueError: naming the file and the bad class or entry (a missing or unreadable file, an unknown wnid with
            its closest matches, an empty entry list, an unknown suffix).
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"class map {path!r} does not exist")
    raw: dict[str, list[str | int]] = {}
    try:
        if file.suffix.lower() == ".json":
            loaded = json.loads(file.read_text())
            if not isinstance(loaded, dict):
                raise ValueError("must hold a JSON object {class name: ImageNet class(es)}")
            for name, value in loaded.items():
                raw.setdefault(str(name).strip(), []).extend(_entries(value))
        elif file.suffix.lower() == ".csv":
            with file.open(newline="") as handle:
                rows = list(csv.reader(handle))[1:]
            for row in rows:
                if row and row[0].strip():
                    raw.setdefault(row[0].strip(), []).extend(e for cell in row[1:] for e in _entries(cell))
        else:
            raise ValueError("must end in .json or .csv")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as err:
        raise ValueError(f"class map {path!r} cannot be read: {err}") from err
    except ValueError as err:
        raise ValueError(f"class map {path!r}: {err}") from err
    resolved, problems = {}, []
    for name, entries in raw.items():
        indices: list[int] = []
        for entry in entries:
            try:
                index = imagenet_index(entry)
            except ValueError as err:
                problems.append(f"class {name!r}: {err}")
                continue
            if index not in indices:
                indices.append(index)
        if not entries:
            problems.append(f"class {name!r} maps to no ImageNet class")
        resolved[name] = indices
    if problems:
        raise ValueError(f"class map {path!r}: " + "; ".join(problems))
    if not resolved:
        raise ValueError(f"class map {path!r} lists no class")
    return resolved


def _entries(value: object) -> list[str | int]:
    if isinstance(value, bool) or not isinstance(value, (str, int, list)):
        raise ValueError(f"an entry must be an index, a name or a list of them, got {value!r}")
    if isinstance(value, list):
        return [e for item in value for e in _entries(item)]
    if isinstance(value, int):
        return [value]
    return [part.strip() for part in value.split(_SEPARATOR) if part.strip()]


def read_wnid_list(path: str) -> list[int]:
    """The ImageNet-1k indices of a list of WordNet ids: a JSON list, or text with one wnid per line (blank lines
    and ``#`` comments ignored; commas and spaces also separate).

    Raises:
        ValueError: naming the file and every unknown wnid with its closest known ones.
    """
    file = Path(path)
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"wnid list {path!r} cannot be read: {err}") from err
    if file.suffix.lower() == ".json":
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"wnid list {path!r} is not valid JSON: {err}") from err
        if not isinstance(loaded, list):
            raise ValueError(f"wnid list {path!r} must hold a JSON list of wnids")
        wnids = [str(w).strip() for w in loaded]
    else:
        lines = (line.split("#", 1)[0] for line in text.splitlines())
        wnids = [w for line in lines for w in re.split(r"[\s,]+", line) if w]
    classes = imagenet_classes()
    unknown = [f"{w!r}{did_you_mean(w, classes.wnids)}" for w in wnids if w not in classes.by_wnid]
    if unknown:
        raise ValueError(f"wnid list {path!r}: not ImageNet-1k wnids: " + "; ".join(unknown))
    if not wnids:
        raise ValueError(f"wnid list {path!r} lists no wnid")
    return sorted({classes.by_wnid[w] for w in wnids})


@functools.cache
def logit_subset(name: str) -> tuple[int, ...] | None:
    """The ImageNet-1k indices of a logit subset: None for ``all``; for ``imagenet_a`` / ``imagenet_r`` the 200
    classes of ImageNet-A / -R, from timm's offline index files (``timm/data/_info/imagenet_{a,r}_indices.txt``)."""
    if name == "all":
        return None
    if name not in LOGIT_SUBSETS:
        raise ValueError(f"logit_subset {name!r} is unknown; choose one of {list(LOGIT_SUBSETS)}")
    from importlib import resources

    text = (resources.files("timm.data") / "_info" / f"{name}_indices.txt").read_text()
    return tuple(sorted(int(line) for line in text.split()))
