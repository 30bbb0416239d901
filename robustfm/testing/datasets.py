"""Tiny data sets on disk, in the real layouts, built from generated images and the photos scikit-image ships.

Every test and the CPU demo use these instead of downloads:

- :func:`make_image_folder` — ``<root>/[<split>/]<class>/<image>``;
- :func:`make_coco_tree` — ``train2017/``, ``val2017/``, ``annotations/instances_*.json`` and ``captions_*.json``;
- :func:`make_imagenet_tree` — ``train/<wnid>/*.JPEG`` and ``val/`` (class folders or flat + ``LOC_val_solution.csv``);
- :func:`write_demo_shards` — a small COCO-style set (real photos + generated shapes, with captions) converted to
  shards by the same :func:`robustfm.data.prepare.run` that converts user data.

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
from PIL import Image

from robustfm.testing.bad_files import BAD_FILE_KINDS, BAD_FILE_SKIP_REASON, write_bad_files
from robustfm.testing.images import (
    PHOTOS,
    class_name,
    class_style,
    draw_shape,
    generated_image,
    gradient_background,
    real_photos,
    save_image,
    square_crop,
)

__all__ = [
    "BAD_FILE_KINDS",
    "BAD_FILE_SKIP_REASON",
    "PHOTOS",
    "FixtureTree",
    "class_name",
    "generated_image",
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
) -> FixtureTree:
    """``<root>/<class>/<image>.jpg`` (or ``<root>/<split>/<class>/...`` when ``splits`` is given).

    Args:
        n_classes: generated classes, named by :func:`class_name` (``red_circle``, ``green_square``, ...).
        per_class: images per class and split.
        bad_files: add every :data:`BAD_FILE_KINDS` file to the first class of the first split.
        with_photos: add a class ``photo`` holding the scikit-image photos (one random crop each).
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
                save_image(
                    generated_image(k, size, int(rng.integers(2**31))), base / class_name(k) / f"img_{i:04d}.jpg"
                )
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
) -> FixtureTree:
    """A COCO 2017-shaped tree: ``train2017/``, ``val2017/``, ``annotations/instances_{split}2017.json`` and
    ``annotations/captions_{split}2017.json``.

    Generated images hold a large shape of their class and a small shape of another class (so the label rule
    "category of the largest object" is exercised); every third image is a random crop of a scikit-image photo
    with one box covering most of it. Category ids are not contiguous, as in COCO. Each image has two captions.
    """
    root = Path(root)
    shape_names = [class_name(k) for k in range(n_shape_classes)]
    photo_categories = sorted({category for category, _ in PHOTOS.values()}) if with_photos else []
    categories = [{"id": 3 * i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(shape_names)]
    categories += [
        {"id": 100 + 2 * i, "name": name, "supercategory": "photo"} for i, name in enumerate(photo_categories)
    ]
    category_id = {c["name"]: c["id"] for c in categories}
    # Labels follow sorted category ids, so label order is the categories' id order.
    tree = FixtureTree(
        root=root, kind="coco", classes=tuple(c["name"] for c in sorted(categories, key=lambda c: c["id"]))
    )
    rng = np.random.default_rng(seed)
    photos = None
    if with_photos:
        import skimage.data

        photos = {name: getattr(skimage.data, name)() for name in PHOTOS}
    next_image_id, next_annotation_id = 1, 1
    for split, count in (("train", n_images), ("val", n_val)):
        folder = root / f"{split}2017"
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations, captions = [], [], []
        counts = tree.counts.setdefault(split, {})
        for i in range(count):
            image_id = next_image_id
            next_image_id += 1
            file_name = f"{image_id:012d}.jpg"
            objects: list[tuple[str, list[float]]] = []
            if photos is not None and i % 3 == 2:
                name = list(PHOTOS)[(i // 3) % len(PHOTOS)]
                category, caption = PHOTOS[name]
                pixels = square_crop(photos[name], size, rng)
                objects.append((category, [2.0, 2.0, size - 4.0, size - 4.0]))
                texts = [caption, f"{caption}, cropped"]
            else:
                k = int(rng.integers(n_shape_classes))
                other = (k + 1 + int(rng.integers(max(1, n_shape_classes - 1)))) % n_shape_classes
                image = Image.fromarray(gradient_background((size, size), rng))
                small = draw_shape(image, *class_style(other), rng, scale=(0.15, 0.25))
                big = draw_shape(image, *class_style(k), rng, scale=(0.5, 0.75))
                pixels = np.asarray(image)
                objects += [(class_name(other), small), (class_name(k), big)]
                shape, color = class_style(k)
                texts = [f"a {color} {shape}", f"a picture of a {color} {shape} on a gradient"]
            save_image(pixels, folder / file_name)
            images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
            for category, box in objects:
                annotations.append(
                    {
                        "id": next_annotation_id,
                        "image_id": image_id,
                        "category_id": category_id[category],
                        "bbox": box,
                        "area": round(box[2] * box[3], 2),
                        "iscrowd": 0,
                    }
                )
                next_annotation_id += 1
            for text in texts:
                captions.append({"id": next_annotation_id, "image_id": image_id, "caption": text})
                next_annotation_id += 1
            largest = max(objects, key=lambda o: o[1][2] * o[1][3])[0]
            counts[largest] = counts.get(largest, 0) + 1
            tree.captions[f"{split}2017/{file_name}"] = texts
        if bad_files and split == "train":
            for kind, (path, expected) in write_bad_files(folder, size, seed, class_index=0).items():
                image_id = next_image_id
                next_image_id += 1
                rel = path.relative_to(root).as_posix()
                images.append({"id": image_id, "file_name": path.name, "width": size, "height": size})
                annotations.append(
                    {
                        "id": next_annotation_id,
                        "image_id": image_id,
                        "category_id": category_id[class_name(0)],
                        "bbox": [1.0, 1.0, 10.0, 10.0],
                        "area": 100.0,
                        "iscrowd": 0,
                    }
                )
                next_annotation_id += 1
                tree.bad_files[kind] = rel
                if BAD_FILE_SKIP_REASON[kind] is None:
                    tree.expected_rgb[rel] = expected  # type: ignore[assignment]
                    counts[class_name(0)] = counts.get(class_name(0), 0) + 1
                else:
                    tree.skipped[rel] = BAD_FILE_SKIP_REASON[kind]  # type: ignore[assignment]
        info = {"description": "robustfm fixture", "version": "1.0"}
        instances = {"info": info, "images": images, "annotations": annotations, "categories": categories}
        _write_json(root / "annotations" / f"instances_{split}2017.json", instances)
        if with_captions:
            _write_json(
                root / "annotations" / f"captions_{split}2017.json",
                {"info": info, "images": images, "annotations": captions},
            )
    return tree


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


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


# --- the demo data set -------------------------------------------------------------------------------------------


def write_demo_shards(
    out_dir: str | Path,
    image_size: int = 64,
    n_images: int = 96,
    seed: int = 0,
    n_val: int | None = None,
    shard_size: int = 32,
) -> Path:
    """Build a small COCO-style data set (scikit-image photos + generated shapes, with labels and captions) under
    ``out_dir/source`` and convert it to shards under ``out_dir/shards`` through :func:`robustfm.data.prepare.run`.

    Uses the running Ray (or starts a local one). Calling it again on the same ``out_dir`` resumes: nothing is
    rewritten. Returns the shard directory (splits "train" and "val").
    """
    from robustfm.data.config import PrepareConfig, SourceConfig
    from robustfm.data.prepare import run

    out_dir = Path(out_dir).resolve()
    source = out_dir / "source"
    if not (source / "annotations" / "instances_val2017.json").is_file():
        make_coco_tree(
            source,
            n_images=n_images,
            n_val=n_val if n_val is not None else max(8, n_images // 4),
            size=image_size,
            seed=seed,
            n_shape_classes=3,
            with_photos=True,
        )
    config = PrepareConfig(
        source=SourceConfig(kind="coco", root=str(source)),
        output=str(out_dir / "shards"),
        shard_size=shard_size,
        progress=False,
    )
    run(config)
    return out_dir / "shards"
