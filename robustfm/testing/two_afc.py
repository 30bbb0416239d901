"""Generated NIGHTS and BAPPS trees for tests and benchmarks: the demo triplets of
:mod:`robustfm.data.demo_two_afc` (a reference, its near copy and another picture, the near one on a random side),
plus the rows a reader must drop (too few votes, a missing file, a corrupt PNG, an unpaired stem), with what the
listing or the converter must make of them."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from robustfm.data.demo_images import save_image
from robustfm.data.demo_two_afc import (
    draw_triplet,
    nights_paths,
    triplet_pictures,
    write_nights_source,
    write_nights_table,
)


@dataclass
class TripletTree:
    """A generated tree and what reading it must give."""

    root: Path
    near_side: dict[str, int] = field(default_factory=dict)
    """Triplet id -> 1 when the near copy is the right candidate, 0 when it is the left one (kept rows only)."""
    dropped: dict[str, str] = field(default_factory=dict)
    """Triplet id -> the skip reason its row must get (listing or conversion)."""


def make_nights_tree(root: Path, per_split: int = 6, size: int = 48, seed: int = 0) -> TripletTree:
    """A NIGHTS layout with splits train, val and test of ``per_split`` kept triplets each; test also gets a row with
    5 votes (``votes_below_6``), a row whose left file is missing (``unreadable``) and a row whose reference is a PNG
    cut in half (``truncated``)."""
    splits = ("train", "val", "test")
    tree = TripletTree(root, near_side=write_nights_source(root, per_split, size, seed, splits))
    with open(root / "data.csv", newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    rng = np.random.default_rng(seed + 1)
    pictures = triplet_pictures(4, size, seed)
    for offset, reason in enumerate(("votes_below_6", "unreadable", "truncated")):
        index = per_split * len(splits) + offset
        triplet_id = f"{index:05d}"
        reference, left, right, near_right = draw_triplet(pictures, index, rng)
        paths = nights_paths(index)
        for rel, pixels in zip(paths, (reference, left, right), strict=True):
            save_image(pixels, root / rel)
        if reason == "unreadable":
            (root / paths[1]).unlink()
        elif reason == "truncated":
            data = (root / paths[0]).read_bytes()
            (root / paths[0]).write_bytes(data[: len(data) // 2])
        votes = 5 if reason == "votes_below_6" else 6
        rows.append([triplet_id, near_right, *paths, "test", "True", votes])
        tree.dropped[triplet_id] = reason
    write_nights_table(root, rows)
    return tree


def make_bapps_tree(
    root: Path, subsets: tuple[str, ...] = ("cnn", "traditional"), per_subset: int = 6, size: int = 64, seed: int = 0
) -> TripletTree:
    """A BAPPS ``2afc/val`` layout: per subset ``per_subset`` triplets whose judgement favours the near copy (a share
    in [0.7, 1] of judges); the first subset also gets an unpaired stem (a reference and ``p0`` without ``p1`` and
    ``judge``) that sorts between two paired ones, so pairing by sorted position would shift every later pair."""
    rng = np.random.default_rng(seed)
    pictures = triplet_pictures(per_subset + 2, size, seed)
    tree = TripletTree(root)
    for s, subset in enumerate(subsets):
        folder = root / "2afc" / "val" / subset
        for name in ("ref", "p0", "p1", "judge"):
            (folder / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_subset):
            stem = f"{index:06d}"
            reference, left, right, near_right = draw_triplet(pictures, index + 3 * s, rng)
            for name, pixels in (("ref", reference), ("p0", left), ("p1", right)):
                save_image(pixels, folder / name / f"{stem}.png")
            share = float(rng.uniform(0.7, 1.0))
            np.save(folder / "judge" / f"{stem}.npy", np.array([share if near_right else 1 - share], np.float32))
            tree.near_side[f"val/{subset}/{stem}"] = near_right
        if s == 0:
            stem = "000000a"
            reference, left, _, _ = draw_triplet(pictures, 99, rng)
            save_image(reference, folder / "ref" / f"{stem}.png")
            save_image(left, folder / "p0" / f"{stem}.png")
            tree.dropped[f"val/{subset}/{stem}"] = "unpaired"
    return tree
