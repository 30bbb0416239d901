"""The images a suite scores: shard rows or generated synthetic rows, and their eval-time preprocessing.

Rows keep the shard schema of ``robustfm.data`` (``id``, ``image`` as encoded bytes, ``label``, ``class_name``,
``captions``), so decoding happens inside the scoring actors, where an undecodable file becomes a counted skip
instead of a failed job.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from robustfm.data.transforms import EVAL_PREPROCESSING, eval_image
from robustfm.evals.config import EvalDataConfig
from robustfm.seeding import sample_seed

PREPROCESSING = EVAL_PREPROCESSING
"""The eval preprocessing the protocol records: the one of :func:`robustfm.data.transforms.eval_image`."""
SYNTHETIC_CLASSES = ("cat", "dog", "car", "tree", "boat", "house", "bird", "flower", "chair", "clock")
_COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
_PLACES = ("on a table", "in a field", "near the sea", "in a city", "in the snow")
BAD_IMAGE_BYTES = b"this is not an image file"


def synthetic_rows(data: EvalDataConfig, seed: int) -> list[dict[str, Any]]:
    """Deterministic rows of smooth random images (PNG bytes), labels, class names, 5 captions each and 2AFC columns
    (``left``, ``right``, ``p_right``: a near copy of the image and another image).

    Args:
        data: how many rows, classes and pixels.
        seed: run seed; each image is drawn from ``sample_seed(id, 0, "synthetic_image", seed)``.
    """
    from PIL import Image

    rows = []
    size = data.synthetic_image_size
    for index in range(data.synthetic_samples):
        sample_id = f"synthetic-{index:06d}"
        rng = np.random.default_rng(sample_seed(sample_id, 0, "synthetic_image", seed))
        label = index % data.synthetic_classes
        class_name = SYNTHETIC_CLASSES[label % len(SYNTHETIC_CLASSES)] + (
            "" if label < len(SYNTHETIC_CLASSES) else f" {label}"
        )
        # Upsampled low-resolution noise: smooth structure, so blurs and JPEG change it the way they change photos.
        coarse = rng.integers(0, 256, size=(max(2, size // 8), max(2, size // 8), 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded = buffer.getvalue() if index < data.synthetic_samples - data.synthetic_bad_images else BAD_IMAGE_BYTES
        captions = [
            f"a {_COLORS[int(rng.integers(len(_COLORS)))]} {class_name} {_PLACES[int(rng.integers(len(_PLACES)))]}"
            for _ in range(5)
        ]
        row = {"id": sample_id, "image": encoded, "label": label, "class_name": class_name, "captions": captions}
        rows.append({**row, **_synthetic_triplet(image, size, rng)})
    return rows


def _synthetic_triplet(image: Any, size: int, rng: np.random.Generator) -> dict[str, Any]:
    """2AFC columns for a synthetic row: a near copy of its image (8 % brighter) and another random image, on a
    side drawn at random; ``p_right`` = 1 when the near copy is on the right (the judges' unanimous choice)."""
    from PIL import Image, ImageEnhance

    coarse = rng.integers(0, 256, size=(max(2, size // 8), max(2, size // 8), 3), dtype=np.uint8)
    other = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    near = ImageEnhance.Brightness(image).enhance(1.08)
    near_right = bool(rng.integers(0, 2))
    left, right = (other, near) if near_right else (near, other)
    return {"left": _png(left), "right": _png(right), "p_right": float(near_right)}


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def load_eval_dataset(
    data: EvalDataConfig,
    seed: int,
    columns: Sequence[str],
    reader: str = "this suite",
    min_blocks: int = 8,
    rows_per_block: int | None = None,
) -> Any:
    """A ``ray.data.Dataset`` of the rows to score, restricted to ``columns`` (``id`` and ``image`` always), in at
    least ``min_blocks`` blocks (so that every actor of a pool gets work even from one shard file); synthetic rows
    come in blocks of ``rows_per_block`` (an actor pool hands out whole blocks: one batch each balances it best).

    ``holdout_fraction`` leaves out every ``round(1/fraction)``-th row in manifest order (as training does), then
    ``max_samples`` keeps the first N rows by id, so the same ids are scored whatever the shard layout.
    """
    import ray.data

    wanted = list(dict.fromkeys(["id", "image", *columns]))
    if data.shards is None:
        rows = synthetic_rows(data, seed)
        if data.max_samples is not None:
            rows = sorted(rows, key=lambda r: r["id"])[: data.max_samples]
        # Several blocks, so that an actor pool has batches to share even on tiny data.
        blocks = max(min_blocks, -(-len(rows) // rows_per_block) if rows_per_block else 0)
        blocks = max(1, min(len(rows), blocks))
        return ray.data.from_items([{k: r[k] for k in wanted} for r in rows], override_num_blocks=blocks)
    from robustfm.data import open_shards
    from robustfm.data.shards import require_columns

    require_columns(data.shards, wanted, reader=reader)  # the shards' own columns (schema v2 declares extra ones)
    dataset = open_shards(data.shards, data.split, columns=wanted, min_blocks=min_blocks)
    if data.max_samples is not None or data.holdout_fraction > 0:
        # The ids are chosen from the id column alone (manifest order: reads keep it); a Ray Data sort would move
        # every image's bytes.
        ids = [row["id"] for row in open_shards(data.shards, data.split, columns=["id"]).take_all()]
        if data.holdout_fraction > 0:
            period = round(1 / data.holdout_fraction)
            ids = [sample_id for index, sample_id in enumerate(ids) if index % period != 0]
        keep = sorted(ids)[: data.max_samples]
        from ray.data.expressions import col

        dataset = dataset.filter(expr=col("id").is_in(keep))
    return dataset


def eval_transform(image: Any, size: int) -> np.ndarray:
    """A PIL RGB image -> float32 [3, size, size] in [0, 1] by the shared eval preprocessing (:data:`PREPROCESSING`).

    Encoded bytes should go through :func:`decode_batch` (or :func:`robustfm.data.transforms.eval_image`) instead:
    the same transform, with the reduced-scale JPEG decode that training-side validation uses too.
    """
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", compress_level=0)  # lossless: the pixels are unchanged
    return eval_image(buffer.getvalue(), size)


def decode_batch(encoded: Sequence[bytes], ids: Sequence[str], size: int) -> tuple[np.ndarray, list[str | None]]:
    """Decode a batch of encoded images with the shared eval preprocessing (:data:`PREPROCESSING`): the pixels
    are those ``ShardBatchSource(train=False)`` gives for the same bytes.

    Returns:
        ``pixels`` [n_ok, 3, size, size] of the decodable images (in order), and per input row ``None`` when it
        decoded or the skip reason (``robustfm.data.images.SkipReason``) when it did not.
    """
    from robustfm.data.images import ImageDecodeError

    pixels, reasons = [], []
    for data, sample_id in zip(encoded, ids, strict=True):
        try:
            pixels.append(eval_image(bytes(data), size, name=f"sample {sample_id}"))
            reasons.append(None)
        except ImageDecodeError as err:
            reasons.append(err.reason)
    stacked = np.stack(pixels) if pixels else np.zeros((0, 3, size, size), dtype=np.float32)
    return stacked, reasons


def ids_hash(ids: Sequence[str]) -> str:
    """SHA-256 of the sorted, newline-joined sample ids: the protocol's fingerprint of which samples were used."""
    digest = hashlib.sha256()
    for sample_id in sorted(set(ids)):
        digest.update(sample_id.encode())
        digest.update(b"\n")
    return digest.hexdigest()
