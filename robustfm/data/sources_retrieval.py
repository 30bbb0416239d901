"""Landmark retrieval layouts (Revisited Oxford and Paris, Radenovic et al. 2018): ``<root>/jpg/<image>.jpg`` and one
``<root>/gnd_<name>.pkl`` holding ``imlist`` (database images, in the order the ground truth indexes them),
``qimlist`` (query images) and ``gnd`` (per query: ``bbx``, ``easy``, ``hard``, ``junk``). Listed as the splits
``database`` and ``query``; the id of a row is its image name. The ground truth is read with a restricted unpickler
(plain data and numpy arrays only): the retrieval suite reads it again, from the path its config names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow.fs as pafs

from robustfm.data.safe_pickle import load_plain_pickle
from robustfm.data.shards import Location, read_bytes
from robustfm.data.sources import LayoutError, SourceItem, SourceListing, _children, _require_root, _select_splits

REVISITOP_SPLITS = ("database", "query")


def read_revisitop_ground_truth(data: bytes, name: str) -> dict[str, Any]:
    """The ground truth of ``gnd_<name>.pkl`` bytes, checked to have ``imlist``, ``qimlist`` and one ``gnd`` entry per
    query with ``easy``, ``hard``, ``junk`` and ``bbx``.

    Raises:
        UnsafePickleError: the pickle holds more than plain data and numpy arrays.
        LayoutError: a key is missing, naming it.
    """
    ground_truth = load_plain_pickle(data, name)
    missing = [key for key in ("imlist", "qimlist", "gnd") if key not in ground_truth]
    if missing:
        raise LayoutError(f"{name} lacks the key(s) {missing}")
    if len(ground_truth["gnd"]) != len(ground_truth["qimlist"]):
        raise LayoutError(f"{name}: {len(ground_truth['gnd'])} gnd entries for {len(ground_truth['qimlist'])} queries")
    for index, entry in enumerate(ground_truth["gnd"]):
        lacking = [key for key in ("easy", "hard", "junk", "bbx") if key not in entry]
        if lacking:
            raise LayoutError(f"{name}: gnd[{index}] lacks the key(s) {lacking}")
    return ground_truth


def ground_truth_file(fs: pafs.FileSystem, location: Location, expected: str) -> str:
    """The one ``gnd_*.pkl`` file of the root (its name, relative to the root)."""
    names = [i.base_name for i in _children(fs, location.base) if i.base_name.startswith("gnd_")]
    names = [n for n in names if n.endswith(".pkl")]
    if len(names) != 1:
        where = location.display()
        raise LayoutError(f"{where} must hold exactly one gnd_<name>.pkl, found {names}; expected {expected}")
    return names[0]


def list_revisitop(location: Location, splits: Sequence[str] = ()) -> SourceListing:
    """List a Revisited Oxford/Paris folder (see the module docstring)."""
    expected = f"revisitop: {location.display('jpg', '<image>.jpg')} and {location.display('gnd_<name>.pkl')}"
    fs = _require_root(location, expected)
    gnd_name = ground_truth_file(fs, location, expected)
    ground_truth = read_revisitop_ground_truth(read_bytes(fs, location.join(gnd_name)), gnd_name)
    chosen = _select_splits(list(REVISITOP_SPLITS), splits, location, expected)
    listing = SourceListing("revisitop", location.canonical, REVISITOP_SPLITS, REVISITOP_SPLITS)
    names = {"database": ground_truth["imlist"], "query": ground_truth["qimlist"]}
    for split in chosen:
        label = REVISITOP_SPLITS.index(split)
        listing.splits[split] = [SourceItem(str(n), f"jpg/{n}.jpg", label, split) for n in names[split]]
    return listing
