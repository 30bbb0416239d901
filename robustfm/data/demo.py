"""The demo data set: a small COCO-style tree of scikit-image photos and generated shapes, converted to shards.

Recipes build it at run time when no data is configured (the CPU demo), tests build it as a fixture; both go
through :func:`robustfm.data.prepare.run`, the path user data take. Nothing is downloaded: the photos are the ones
scikit-image ships (so scikit-image is a runtime dependency of the demo).

- :func:`write_coco_source` writes ``train2017/``, ``val2017/``, ``annotations/instances_*.json`` (and
  ``captions_*.json``), optionally with a mirrored tree of exact foreground masks;
- :func:`write_demo_shards` converts it (``with_masks=True``: through the converter's ``source.masks`` path, into
  shards with a ``mask`` column).

Generated images hold a large shape of their class and a small shape of another class (so the label rule "category
of the largest object" is exercised); every third image is a photo: a random crop of a scikit-image photo, or with
masks a horse silhouette filled with a photo's texture (a photo has no exact mask). Category ids are not
contiguous, as in COCO. Each image has two captions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from robustfm.data.demo_images import (
    PHOTOS,
    class_name,
    class_style,
    draw_shape,
    gradient_background,
    horse_image_and_mask,
    real_photos,
    save_image,
    save_mask,
    square_crop,
)

DEMO_MASK_MEANING = "foreground: 255 where a shape or the horse was painted, 0 on the background gradient"
HORSE_CATEGORY = "horse"


@dataclass
class CocoSource:
    """What :func:`write_coco_source` wrote, and what a correct conversion of it must find."""

    root: Path
    classes: tuple[str, ...]
    """Category names in label order (sorted category ids)."""
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """split -> class name (the largest object's) -> images."""
    captions: dict[str, list[str]] = field(default_factory=dict)
    """Path relative to ``root`` (posix) -> captions."""
    masks: Path | None = None
    """Root of the mask tree (``<split>2017/<id>.png``), when written."""


def write_coco_source(
    root: str | Path,
    n_images: int = 8,
    n_val: int = 4,
    size: int = 48,
    seed: int = 0,
    n_shape_classes: int = 3,
    with_photos: bool = True,
    with_captions: bool = True,
    masks: str | Path | None = None,
) -> CocoSource:
    """Write a COCO 2017-shaped tree (see the module docstring).

    Args:
        n_images, n_val: images of the train and val splits.
        size: side of the square images.
        n_shape_classes: generated shape classes (``red_circle``, ``green_square``, ...).
        with_photos: every third image is a photo (without ``masks``: a crop of a scikit-image photo; with: a horse
            silhouette filled with a photo texture, category ``horse``).
        masks: where to write the masks (a tree mirroring the images: ``<masks>/train2017/<id>.png``); None: none.
    """
    root = Path(root)
    mask_root = Path(masks) if masks is not None else None
    shape_names = [class_name(k) for k in range(n_shape_classes)]
    if not with_photos:
        photo_categories: list[str] = []
    elif mask_root is not None:
        photo_categories = [HORSE_CATEGORY]
    else:
        photo_categories = sorted({category for category, _ in PHOTOS.values()})
    categories = [{"id": 3 * i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(shape_names)]
    categories += [
        {"id": 100 + 2 * i, "name": name, "supercategory": "photo"} for i, name in enumerate(photo_categories)
    ]
    category_id = {c["name"]: c["id"] for c in categories}
    # Labels follow sorted category ids, so label order is the categories' id order.
    source = CocoSource(root, tuple(c["name"] for c in sorted(categories, key=lambda c: c["id"])), masks=mask_root)
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
        counts = source.counts.setdefault(split, {})
        for i in range(count):
            image_id = next_image_id
            next_image_id += 1
            file_name = f"{image_id:012d}.jpg"
            objects: list[tuple[str, list[float]]] = []
            mask = None
            if photos is not None and i % 3 == 2:
                name = list(PHOTOS)[(i // 3) % len(PHOTOS)]
                category, caption = PHOTOS[name]
                texture = square_crop(photos[name], size, rng)
                if mask_root is None:
                    pixels = texture
                    objects.append((category, [2.0, 2.0, size - 4.0, size - 4.0]))
                    texts = [caption, f"{caption}, cropped"]
                else:
                    pixels, mask, box = horse_image_and_mask(size, rng, texture)
                    objects.append((HORSE_CATEGORY, box))
                    texts = [f"a horse cut out of {caption}", "a horse silhouette on a gradient"]
            else:
                k = int(rng.integers(n_shape_classes))
                other = (k + 1 + int(rng.integers(max(1, n_shape_classes - 1)))) % n_shape_classes
                image = Image.fromarray(gradient_background((size, size), rng))
                painted = Image.new("L", image.size, 0)
                small = draw_shape(image, *class_style(other), rng, scale=(0.15, 0.25), mask=painted)
                big = draw_shape(image, *class_style(k), rng, scale=(0.5, 0.75), mask=painted)
                pixels, mask = np.asarray(image), np.asarray(painted)
                objects += [(class_name(other), small), (class_name(k), big)]
                shape, color = class_style(k)
                texts = [f"a {color} {shape}", f"a picture of a {color} {shape} on a gradient"]
            save_image(pixels, folder / file_name)
            if mask_root is not None and mask is not None:
                save_mask(mask, mask_root / f"{split}2017" / f"{image_id:012d}.png")
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
            source.captions[f"{split}2017/{file_name}"] = texts
        info = {"description": "robustfm demo", "version": "1.0"}
        instances = {"info": info, "images": images, "annotations": annotations, "categories": categories}
        write_json(root / "annotations" / f"instances_{split}2017.json", instances)
        if with_captions:
            write_json(
                root / "annotations" / f"captions_{split}2017.json",
                {"info": info, "images": images, "annotations": captions},
            )
    return source


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def write_demo_shards(
    out_dir: str | Path,
    image_size: int = 64,
    n_images: int = 96,
    seed: int = 0,
    n_val: int | None = None,
    shard_size: int = 32,
    with_masks: bool = False,
) -> Path:
    """Build the demo COCO-style source under ``out_dir`` and convert it to shards with
    :func:`robustfm.data.prepare.run`.

    Uses the running Ray (or starts a local one). Calling it again on the same ``out_dir`` resumes: nothing is
    rewritten.

    Args:
        image_size: side of the square source images.
        n_images, n_val: images of the train and val splits (``n_val`` None: ``max(8, n_images // 4)``).
        seed: draws of the generated images and photo crops.
        shard_size: images per shard.
        with_masks: also write exact foreground masks (``out_dir/masks``) and convert through the converter's
            ``source.masks`` path: the shards get a ``mask`` column (8-bit, 0 / 255). The source and shards then
            live in ``out_dir/source_masked`` and ``out_dir/shards_masked``, beside the plain demo.

    Returns:
        The shard directory (splits "train" and "val"): ``out_dir/shards`` (or ``out_dir/shards_masked``).
    """
    from robustfm.data.config import PrepareConfig, SourceConfig
    from robustfm.data.prepare import run

    out_dir = Path(out_dir).resolve()
    source = out_dir / ("source_masked" if with_masks else "source")
    masks = out_dir / "masks" if with_masks else None
    shards = out_dir / ("shards_masked" if with_masks else "shards")
    # The val annotations are written last: when they exist, the whole source (and its masks) is there.
    if not (source / "annotations" / "instances_val2017.json").is_file():
        write_coco_source(
            source,
            n_images=n_images,
            n_val=n_val if n_val is not None else max(8, n_images // 4),
            size=image_size,
            seed=seed,
            n_shape_classes=3,
            with_photos=True,
            masks=masks,
        )
    source_config = SourceConfig(
        kind="coco",
        root=str(source),
        masks=None if masks is None else str(masks),
        **({"mask_meaning": DEMO_MASK_MEANING} if with_masks else {}),
    )
    run(PrepareConfig(source=source_config, output=str(shards), shard_size=shard_size, progress=False))
    return shards


TEXTURES = ("brick", "grass", "gravel")
"""scikit-image's grayscale textures, used as backgrounds beside its colour photos."""


def write_background_folder(out_dir: str | Path, image_size: int = 64) -> Path:
    """A folder of real backgrounds (scikit-image's colour photos and textures, square, ``image_size`` px, PNG) for
    COVAR's Bg-varied composites (``eval.suites.covar.backgrounds.folder``). Returns the folder."""
    import skimage.data

    out = Path(out_dir)
    for name, pixels in real_photos(image_size).items():
        save_image(pixels, out / f"{name}.png")
    for name in TEXTURES:
        gray = square_crop(np.stack([getattr(skimage.data, name)()] * 3, axis=-1), image_size)
        save_image(gray, out / f"{name}.png")
    return out
