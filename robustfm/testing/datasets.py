"""Tiny data sets on disk, in the real layouts, built from generated images and the photos scikit-image ships.

Every test and the CPU demo use these instead of downloads:

- :func:`make_image_folder` — ``<root>/[<split>/]<class>/<image>``;
- :func:`make_coco_tree` — ``train2017/``, ``val2017/``, ``annotations/instances_*.json`` and ``captions_*.json``;
- :func:`make_imagenet_tree` — ``train/<wnid>/*.JPEG`` and ``val/`` (class folders or flat + ``LOC_val_solution.csv``);
- :func:`write_demo_shards` — the library's demo set (:mod:`robustfm.data.demo`: real photos + generated shapes,
  with captions, optionally with exact masks) converted to shards by :func:`robustfm.data.prepare.run`.

Generated images are class-dependent (shape and colour of the main object), so a tiny model can learn them; each
builder returns a :class:`FixtureTree` that says what a correct conversion must find. With ``bad_files=True`` every
bad-file kind of :data:`BAD_FILE_KINDS` is added: the decodable ones count as images of their class, the others
are listed in ``FixtureTree.skipped`` with the reason the converter must record.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from robustfm.data.demo import write_coco_source, write_demo_shards, write_json
from robustfm.data.demo_images import (
    PHOTOS,
    class_name,
    class_style,
    generated_image,
    generated_image_and_mask,
    real_photos,
    save_image,
    save_mask,
    square_crop,
)
from robustfm.testing.bad_files import BAD_FILE_KINDS, BAD_FILE_SKIP_REASON, write_bad_files

__all__ = [
    "BAD_FILE_KINDS",
    "BAD_FILE_SKIP_REASON",
    "PHOTOS",
    "FixtureTree",
    "class_name",
    "generated_image",
    "generated_image_and_mask",
    "make_coco_tree",
    "make_image_folder",
    "make_imagenet_tree",
    "real_photos",
    "write_bad_files",
    "write_demo_shards",
]


@dataclass
class FixtureTree:
    """What was written, and what a correct conversion of it must report."""

    root: Path
    kind: str
    """Source kind as registered in ``robustfm.data.SOURCES``: "image_folder", "coco" or "imagenet"."""
    classes: tuple[str, ...]
    """Class names in label order (label i is ``classes[i]``)."""
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """split -> class name -> number of images that must end up in the shards."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Path relative to ``root`` (posix) -> skip reason, for every file that must be skipped."""
    bad_files: dict[str, str] = field(default_factory=dict)
    """Bad-file kind -> path relative to ``root``."""
    expected_rgb: dict[str, np.ndarray] = field(default_factory=dict)
    """Path relative to ``root`` -> the upright RGB pixels a decodable bad file must decode to (JPEG-lossy ones
    only approximately)."""
    captions: dict[str, list[str]] = field(default_factory=dict)
    """Path relative to ``root`` -> captions (COCO only)."""
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    """Path relative to ``root`` -> the exact mask written for it (uint8 HW), when a mask tree was written."""

    def total(self, split: str) -> int:
        """Images of ``split`` that must end up in the shards."""
        return sum(self.counts.get(split, {}).values())


def _add_bad_files(
    tree: FixtureTree, directory: Path, split: str, label_name: str, content_index: int, size: int, seed: int
) -> None:
    for kind, (path, expected) in write_bad_files(directory, size, seed, content_index).items():
        rel = path.relative_to(tree.root).as_posix()
        tree.bad_files[kind] = rel
        reason = BAD_FILE_SKIP_REASON[kind]
        if reason is None:
            tree.expected_rgb[rel] = expected  # type: ignore[assignment]
            counts = tree.counts.setdefault(split, {})
            counts[label_name] = counts.get(label_name, 0) + 1
        else:
            tree.skipped[rel] = reason


# --- the three layouts -------------------------------------------------------------------------------------------


def make_image_folder(
    root: str | Path,
    n_classes: int = 3,
    per_class: int = 4,
    size: int = 48,
    bad_files: bool = False,
    seed: int = 0,
    splits: Sequence[str] | None = None,
    with_photos: bool = False,
    masks: str | Path | None = None,
    masks_with_splits: bool = True,
) -> FixtureTree:
    """``<root>/<class>/<image>.jpg`` (or ``<root>/<split>/<class>/...`` when ``splits`` is given).

    Args:
        n_classes: generated classes, named by :func:`class_name` (``red_circle``, ``green_square``, ...).
        per_class: images per class and split.
        bad_files: add every :data:`BAD_FILE_KINDS` file to the first class of the first split.
        with_photos: add a class ``photo`` holding the scikit-image photos (one random crop each).
        masks: write the exact foreground mask of every generated image under this root, mirroring the images
            (``<masks>/[<split>/]<class>/<image>.png``; recorded in ``FixtureTree.masks``). Photos and bad files
            get none.
        masks_with_splits: with ``splits``, keep the split folder in the mask tree (else ``<masks>/<class>/...``).
    """
    root = Path(root)
    names = [class_name(k) for k in range(n_classes)] + (["photo"] if with_photos else [])
    tree = FixtureTree(root=root, kind="image_folder", classes=tuple(sorted(names)))
    rng = np.random.default_rng(seed)
    for split_index, split in enumerate(splits or ("train",)):
        base = root / split if splits else root
        counts = tree.counts.setdefault(split, {})
        for k in range(n_classes):
            for i in range(per_class):
                pixels, mask = generated_image_and_mask(k, size, int(rng.integers(2**31)))
                path = base / class_name(k) / f"img_{i:04d}.jpg"
                save_image(pixels, path)
                if masks is not None:
                    inside = path.relative_to(base if splits and not masks_with_splits else root)
                    save_mask(mask, Path(masks) / inside.with_suffix(".png"))
                    tree.masks[path.relative_to(root).as_posix()] = mask
            counts[class_name(k)] = per_class
        if with_photos:
            import skimage.data

            for name in PHOTOS:
                save_image(square_crop(getattr(skimage.data, name)(), size, rng), base / "photo" / f"{name}.jpg")
            counts["photo"] = len(PHOTOS)
        if bad_files and split_index == 0:
            _add_bad_files(tree, base / class_name(0), split, class_name(0), 0, size, seed)
    # A hidden file (as macOS leaves behind) is not data and must not be reported either.
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return tree


def make_coco_tree(
    root: str | Path,
    n_images: int = 8,
    n_val: int = 4,
    size: int = 48,
    bad_files: bool = False,
    seed: int = 0,
    n_shape_classes: int = 3,
    with_photos: bool = True,
    with_captions: bool = True,
    masks: str | Path | None = None,
) -> FixtureTree:
    """A COCO 2017-shaped tree: :func:`robustfm.data.demo.write_coco_source` (the demo set's builder), plus with
    ``bad_files`` every :data:`BAD_FILE_KINDS` file added to ``train2017`` and its annotations."""
    source = write_coco_source(
        root, n_images, n_val, size, seed, n_shape_classes, with_photos, with_captions, masks=masks
    )
    tree = FixtureTree(
        root=source.root, kind="coco", classes=source.classes, counts=source.counts, captions=source.captions
    )
    if bad_files:
        _add_coco_bad_files(tree, size, seed, with_captions)
    return tree


def _add_coco_bad_files(tree: FixtureTree, size: int, seed: int, with_captions: bool) -> None:
    instances_path = tree.root / "annotations" / "instances_train2017.json"
    instances = json.loads(instances_path.read_text())
    first_class = next(c["id"] for c in instances["categories"] if c["name"] == class_name(0))
    # Ids stay unique across both splits, as in COCO.
    everything = [instances, json.loads((tree.root / "annotations" / "instances_val2017.json").read_text())]
    next_image_id = 1 + max(im["id"] for data in everything for im in data["images"])
    next_annotation_id = 1 + max((a["id"] for data in everything for a in data["annotations"]), default=0)
    counts = tree.counts.setdefault("train", {})
    new_images = []
    for kind, (path, expected) in write_bad_files(tree.root / "train2017", size, seed, class_index=0).items():
        rel = path.relative_to(tree.root).as_posix()
        new_images.append({"id": next_image_id, "file_name": path.name, "width": size, "height": size})
        instances["annotations"].append(
            {
                "id": next_annotation_id,
                "image_id": next_image_id,
                "category_id": first_class,
                "bbox": [1.0, 1.0, 10.0, 10.0],
                "area": 100.0,
                "iscrowd": 0,
            }
        )
        next_image_id += 1
        next_annotation_id += 1
        tree.bad_files[kind] = rel
        if BAD_FILE_SKIP_REASON[kind] is None:
            tree.expected_rgb[rel] = expected  # type: ignore[assignment]
            counts[class_name(0)] = counts.get(class_name(0), 0) + 1
        else:
            tree.skipped[rel] = BAD_FILE_SKIP_REASON[kind]  # type: ignore[assignment]
    instances["images"] += new_images
    write_json(instances_path, instances)
    if with_captions:
        captions_path = tree.root / "annotations" / "captions_train2017.json"
        captions = json.loads(captions_path.read_text())
        captions["images"] += new_images
        write_json(captions_path, captions)


def imagenet_wnid(index: int) -> str:
    """A WordNet-style id for generated class ``index`` (sorted order = label order)."""
    return f"n{1000000 + 4373 * index:08d}"


def make_imagenet_tree(
    root: str | Path,
    n_classes: int = 3,
    per_class: int = 4,
    val_per_class: int = 2,
    size: int = 48,
    bad_files: bool = False,
    seed: int = 0,
    val_layout: str = "folders",
    with_synset_names: bool = True,
) -> FixtureTree:
    """An ILSVRC-shaped tree: ``train/<wnid>/<wnid>_<i>.JPEG`` and a validation split.

    Args:
        val_layout: ``"folders"`` (``val/<wnid>/*.JPEG``) or ``"loc_csv"`` (flat ``val/ILSVRC2012_val_*.JPEG`` and
            ``LOC_val_solution.csv`` at the root, as Kaggle ships it).
        with_synset_names: write ``LOC_synset_mapping.txt`` (``<wnid> <name>, <synonym>``); class names are then
            the first name, else the wnid.
    """
    if val_layout not in ("folders", "loc_csv"):
        raise ValueError(f"val_layout must be 'folders' or 'loc_csv', got {val_layout!r}")
    root = Path(root)
    wnids = [imagenet_wnid(k) for k in range(n_classes)]
    names = [class_name(k).replace("_", " ") if with_synset_names else wnids[k] for k in range(n_classes)]
    tree = FixtureTree(root=root, kind="imagenet", classes=tuple(names))
    rng = np.random.default_rng(seed)
    for k, wnid in enumerate(wnids):
        for i in range(per_class):
            save_image(generated_image(k, size, int(rng.integers(2**31))), root / "train" / wnid / f"{wnid}_{i}.JPEG")
    tree.counts["train"] = dict(Counter({names[k]: per_class for k in range(n_classes)}))
    solution = ["ImageId,PredictionString"]
    number = 1
    for k, wnid in enumerate(wnids):
        for _ in range(val_per_class):
            stem = f"ILSVRC2012_val_{number:08d}"
            number += 1
            folder = root / "val" / wnid if val_layout == "folders" else root / "val"
            save_image(generated_image(k, size, int(rng.integers(2**31))), folder / f"{stem}.JPEG")
            solution.append(f"{stem},{wnid} 1 1 {size - 2} {size - 2}")
    tree.counts["val"] = {names[k]: val_per_class for k in range(n_classes)}
    if val_layout == "loc_csv":
        (root / "LOC_val_solution.csv").write_text("\n".join(solution) + "\n")
    if with_synset_names:
        lines = [f"{wnid} {names[k]}, {class_style(k)[0]}" for k, wnid in enumerate(wnids)]
        (root / "LOC_synset_mapping.txt").write_text("\n".join(lines) + "\n")
    if bad_files:
        _add_bad_files(tree, root / "train" / wnids[0], "train", names[0], 0, size, seed)
    return tree
