"""COVAR's inputs and rules: the background pool, the stored foreground masks, the table of similar class pairs, the
overlap of a map with a mask, and the offline deviations the protocol records.

Read on the driver before Ray starts (the pool, the pairs) or in the scoring actors (masks); imports numpy only at
import time.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robustfm.config.core import check
from robustfm.seeding import sample_seed

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
OFFLINE_DEVIATIONS = (
    "Bg-varied: exact composites of the mask's foreground, not generative background edits",
    "translate/rotation: black borders, not inpainted",
    "scale: the composite shrunk by a side factor in (2, 4, 6, 8) onto the same background (or black), not outpainted",
    "viewpoint: not generated (needs a novel-view model, unavailable offline)",
)


@dataclass(frozen=True)
class CovarBackgroundsConfig:
    """The background pool: a shard split or an image folder (one of the two)."""

    shards: str | None = None
    """Shard directory whose ``split`` images are the backgrounds."""
    split: str = "val"
    """Split of ``shards``."""
    folder: str | None = None
    """A folder of background images (every image file below it, sorted by relative path)."""
    max_backgrounds: int | None = None
    """Use the first N backgrounds by id (None: all)."""

    def __post_init__(self) -> None:
        check(not (self.shards and self.folder), "shards", self.shards, "set either shards or folder, not both")
        check(self.max_backgrounds is None or self.max_backgrounds >= 1, "max_backgrounds", self.max_backgrounds,
              "must be >= 1 or null")  # fmt: skip


def load_backgrounds(pool: CovarBackgroundsConfig) -> dict[str, bytes]:
    """``{background id: encoded bytes}`` of the pool, the first ``max_backgrounds`` by id.

    Raises:
        ValueError: naming the field, for an unset, missing or empty pool.
    """
    if pool.folder:
        root = Path(pool.folder)
        if not root.is_dir():
            raise ValueError(f"eval.suites.covar.backgrounds.folder: {pool.folder!r} is not a directory")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        chosen = files[: pool.max_backgrounds]
        found = {str(path.relative_to(root)): path.read_bytes() for path in chosen}
    elif pool.shards:
        from robustfm.data.shards import Location, list_split

        rows = list_split(Location(pool.shards), pool.split).read_rows(["id", "image"])
        order = sorted(range(len(rows["id"])), key=lambda i: rows["id"][i])[: pool.max_backgrounds]
        found = {rows["id"][i]: rows["image"][i] for i in order}
    else:
        raise ValueError(
            "eval.suites.covar.backgrounds: no background pool; set backgrounds.shards (a shard split) or "
            "backgrounds.folder (an image folder)"
        )
    if not found:
        where = pool.folder or f"{pool.shards} split {pool.split!r}"
        raise ValueError(f"eval.suites.covar.backgrounds: the pool at {where} has no images")
    return found


def backgrounds_of(sample_id: str, pool_ids: list[str], count: int, seed: int) -> list[str]:
    """The ``count`` backgrounds of one image: a permutation of the pool seeded by the image id (repeats only when
    the pool is smaller than ``count``)."""
    rng = np.random.default_rng(sample_seed(sample_id, 0, "covar/backgrounds", seed))
    order = [pool_ids[i] for i in rng.permutation(len(pool_ids))]
    return [order[i % len(order)] for i in range(count)]


def foreground(mask: np.ndarray) -> np.ndarray:
    """A stored mask as {0, 1}: any value > 0 for {0, 1} masks, >= 128 for 8-bit ones (mattes threshold at 0.5)."""
    return (mask >= (128 if mask.max(initial=0) > 1 else 1)).astype(np.float32)


def read_similar_pairs(path: str) -> set[frozenset[str]]:
    """Unordered class-name pairs from a CSV with a header row and (at least) two columns."""
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        next(reader, None)
        return {frozenset((row[0].strip(), row[1].strip())) for row in reader if len(row) >= 2}


def map_overlap(maps: Any, masks: Any, binarize: str) -> Any:
    """IoU ``(N,)`` of [0,1] maps ``(N, H, W)`` with {0,1} masks ``(N, H, W)``: soft (sum min / sum max) or hard (map
    above its mean)."""
    import torch

    if binarize == "mean":
        maps = (maps > maps.flatten(1).mean(1).view(-1, 1, 1)).float()
    inter = torch.minimum(maps, masks).flatten(1).sum(1)
    union = torch.maximum(maps, masks).flatten(1).sum(1)
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(union))


def fine_error_kind(params: dict[str, Any]) -> str:
    """``fine_er`` when a table of similar pairs decides, else ``fine_er_proxy`` (the text-embedding cosine rule)."""
    return "fine_er" if params.get("similar_pairs") else "fine_er_proxy"


def foreground_mask(image: bytes, mask: bytes, size: int, sample: str) -> tuple[Any, str | None]:
    """The {0,1} foreground ``(1, size, size)`` float tensor of a stored mask under the eval transform (the image's
    centred square, nearest resize), or ``(None, reason)``: ``mask_size`` (stored sizes differ), ``mask_invalid``
    (undecodable), ``empty_mask`` / ``full_mask`` (no foreground or no background to vary)."""
    import io

    import torch
    from PIL import Image

    from robustfm.data.images import ImageDecodeError
    from robustfm.data.masks import decode_mask_crop_resize
    from robustfm.data.transforms import center_box

    try:
        with Image.open(io.BytesIO(bytes(image))) as stored_image, Image.open(io.BytesIO(bytes(mask))) as stored:
            if stored_image.size != stored.size:
                return None, "mask_size"
        values = decode_mask_crop_resize(bytes(mask), center_box, size, f"sample {sample} mask")
    except (ImageDecodeError, OSError):
        return None, "mask_invalid"
    binary = foreground(values)
    if binary.sum() == 0:
        return None, "empty_mask"
    if binary.sum() == binary.size:
        return None, "full_mask"
    return torch.from_numpy(binary)[None], None
