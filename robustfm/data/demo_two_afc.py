"""A demo 2AFC set in NIGHTS' layout, from the demo pictures (scikit-image photos, then generated images): each
triplet is a reference, a near copy of it (brightness x U(0.9, 1.1) and a light blur: "the same picture" to a human)
and another picture, the near copy on a side drawn at random, with a unanimous vote for it. Recipes whose milestones
run the ``two_afc`` suite build it when no triplet shards are configured (the CPU demo); tests add the rows a reader
must drop on top of it. Its numbers show the pipeline, not a perceptual metric: real NIGHTS or BAPPS shards do that.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from robustfm.data.demo_images import generated_image, real_photos, save_image

NIGHTS_HEADER = ("id", "right_vote", "ref_path", "left_path", "right_path", "split", "is_imagenet", "votes")


def triplet_pictures(count: int, size: int, seed: int) -> list[np.ndarray]:
    """``count`` distinct pictures of ``size``: the real photos first, then generated images."""
    photos = list(real_photos(size).values())
    generated = [generated_image(i % 7, size, seed + 101 * i) for i in range(max(0, count - len(photos)))]
    return (photos + generated)[:count]


def near_copy(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A small edit of ``pixels`` (uint8 HWC): brightness x U(0.9, 1.1) and a Gaussian blur of radius 0.6."""
    image = ImageEnhance.Brightness(Image.fromarray(pixels)).enhance(float(rng.uniform(0.9, 1.1)))
    return np.asarray(image.filter(ImageFilter.GaussianBlur(0.6)))


def draw_triplet(pictures: list[np.ndarray], index: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """(reference, left, right, near_right): picture ``index`` (cyclically), its near copy and another picture, the
    near copy on the right when ``near_right`` is 1."""
    reference = pictures[index % len(pictures)]
    far = pictures[(index + 1 + int(rng.integers(0, len(pictures) - 1))) % len(pictures)]
    if far is reference:
        far = pictures[(index + 1) % len(pictures)]
    near_right = int(rng.integers(0, 2))
    near = near_copy(reference, rng)
    left, right = (far, near) if near_right else (near, far)
    return reference, left, right, near_right


def write_nights_source(
    root: str | Path, per_split: int = 12, size: int = 64, seed: int = 0, splits: tuple[str, ...] = ("val", "test")
) -> dict[str, int]:
    """Write a NIGHTS layout (``data.csv``, ``ref/``, ``distort/``) of ``per_split`` unanimous triplets per split,
    alternating between the ``imagenet`` and ``no_imagenet`` subsets. Returns triplet id -> 1 when the near copy is
    the right candidate, else 0."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    pictures = triplet_pictures(per_split + 2, size, seed)
    rows, near_side = [], {}
    for index in range(per_split * len(splits)):
        triplet_id = f"{index:05d}"
        reference, left, right, near_right = draw_triplet(pictures, index, rng)
        paths = nights_paths(index)
        for rel, pixels in zip(paths, (reference, left, right), strict=True):
            save_image(pixels, root / rel)
        split = splits[index // per_split]
        rows.append([triplet_id, near_right, *paths, split, "True" if index % 2 == 0 else "False", 6])
        near_side[triplet_id] = near_right
    write_nights_table(root, rows)
    return near_side


def nights_paths(index: int) -> tuple[str, str, str]:
    """NIGHTS' relative paths of triplet ``index``: ``ref/XXX/YYY.png``, ``distort/XXX/YYY_0.png``, ``..._1.png``."""
    folder, stem = f"{index // 10:03d}", f"{index:03d}"
    return f"ref/{folder}/{stem}.png", f"distort/{folder}/{stem}_0.png", f"distort/{folder}/{stem}_1.png"


def write_nights_table(root: Path, rows: list[list]) -> None:
    """``data.csv`` with NIGHTS' named columns (written last: when it exists, the images are there)."""
    with open(root / "data.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(NIGHTS_HEADER)
        writer.writerows(rows)


def write_demo_two_afc(out_dir: str | Path, image_size: int = 64, per_split: int = 12, seed: int = 0) -> Path:
    """Build the demo NIGHTS-style source under ``out_dir/source`` and convert it with
    :func:`robustfm.data.prepare.run` (source ``nights``; splits ``val`` and ``test``). Uses the running Ray (or
    starts a local one); a second call on the same ``out_dir`` finds it. Returns the shard directory."""
    from robustfm.data.config import PrepareConfig, SourceConfig
    from robustfm.data.prepare import run

    out_dir = Path(out_dir).resolve()
    source, shards = out_dir / "source", out_dir / "shards"
    if not (source / "data.csv").is_file():
        write_nights_source(source, per_split=per_split, size=image_size, seed=seed)
    if not (shards / "manifest.json").is_file():
        config = PrepareConfig(source=SourceConfig(kind="nights", root=str(source)), output=str(shards), progress=False)
        run(config)
    return shards
