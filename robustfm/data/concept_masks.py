"""Concept masks: the file formats a mask tree may hold, and per-concept files merged into one mask per image.

CFT (paper 001 §3.2) supervises relevance with a binary concept mask S(I) = max_k M_k(I): the union of the masks a
grounding model returned for each validated concept k of the image's class. This module turns what such pipelines
write into the shards' ``mask`` column, so the training side only ever sees one 8-bit mask per row.

Formats (``source.mask_format``):

- ``binary`` (default): single-channel 8-bit files, values kept exactly (:func:`robustfm.data.masks.mask_values`).
- ``imagenet_s``: RGB PNGs whose pixel label is ``R + 256 * G`` (ImageNet-S, and the CFT authors' concept files).
  Labels 0 (background) and 1000 (ImageNet-S "other": ambiguous pixels) are background, as the CFT authors' loader
  reads them; every other label becomes 255. The stored mask is binary on purpose: labels run to 999 and do not fit
  8 bits, the row's class is already in its ``label`` column, and the CFT loss reads S = mask > 0. Files that are not
  RGB, have a non-zero blue channel or labels above 1000 are refused (``mask_invalid``): they are not in this format,
  and guessing would store a wrong mask.

Per-concept files: ``<stem>__<concept>.png`` beside (or instead of) ``<stem>.png``, in the folder where the image's
mask would be. Every file of the image is decoded in the source's format, checked against the image size and merged
by maximum (for 0/255 masks: the union). The concept is the part after the *last* ``__``, so concept names must not
contain ``__`` while image stems may. An image with no file at all is skipped (``mask_missing``), never given an
empty mask; one bad file skips the image with the file named (``mask_invalid``, ``mask_size_mismatch``).
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Sequence

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from robustfm.data.images import ImageDecodeError, SkipReason
from robustfm.data.masks import mask_values, open_upright_mask
from robustfm.data.row_columns import MaskTree, RowSkipped, mask_candidates, read_source
from robustfm.data.sources import SourceItem

MASK_FORMATS = ("binary", "imagenet_s")
"""Values of ``source.mask_format``."""
CONCEPT_SEPARATOR = "__"
"""Between an image's stem and a concept's name in a per-concept file name."""
IMAGENET_S_OTHER = 1000
"""ImageNet-S label of pixels annotated as "other" (ambiguous); background for CFT, as in the authors' loader."""
FOREGROUND = 255


def imagenet_s_labels(data: bytes, name: str = "<mask>") -> np.ndarray:
    """Decode an ImageNet-S style RGB PNG into its int32 (H, W) labels ``R + 256 * G`` (EXIF orientation applied).

    Raises:
        ImageDecodeError: :data:`SkipReason.MASK_INVALID` for undecodable files, other modes than RGB, a non-zero
            blue channel, or labels above 1000.
    """
    image = open_upright_mask(data, name)
    if image.mode != "RGB":
        raise ImageDecodeError(
            SkipReason.MASK_INVALID,
            f"{name}: mode {image.mode} is not an imagenet_s mask (RGB, label = R + 256*G); "
            "single-channel masks are the binary format",
        )
    rgb = np.asarray(image).astype(np.int32)
    if rgb[..., 2].any():
        raise ImageDecodeError(
            SkipReason.MASK_INVALID,
            f"{name}: blue channel is not zero (max {rgb[..., 2].max()}); imagenet_s labels are R + 256*G only",
        )
    labels = rgb[..., 0] + 256 * rgb[..., 1]
    if labels.size and labels.max() > IMAGENET_S_OTHER:
        raise ImageDecodeError(
            SkipReason.MASK_INVALID,
            f"{name}: label {labels.max()} is above {IMAGENET_S_OTHER}; imagenet_s labels are 0..{IMAGENET_S_OTHER}",
        )
    return labels


def imagenet_s_foreground(labels: np.ndarray) -> np.ndarray:
    """uint8 (H, W): 255 where the label is an object class, 0 for background (0) and "other" (1000)."""
    return np.where((labels != 0) & (labels != IMAGENET_S_OTHER), FOREGROUND, 0).astype(np.uint8)


def decode_mask(data: bytes, name: str, mask_format: str) -> np.ndarray:
    """uint8 (H, W) mask values of one file in ``mask_format`` (see the module docstring).

    Raises:
        ImageDecodeError: :data:`SkipReason.MASK_INVALID`, naming ``name``.
        ValueError: for a format not in :data:`MASK_FORMATS`.
    """
    if mask_format == "binary":
        return mask_values(data, name)
    if mask_format == "imagenet_s":
        return imagenet_s_foreground(imagenet_s_labels(data, name))
    raise ValueError(f"mask_format {mask_format!r} is not one of {', '.join(MASK_FORMATS)}")


def split_concept_file(file_name: str) -> tuple[str, str] | None:
    """``"n01_7__long beak.png"`` -> (``"n01_7"``, ``"long beak"``): the image stem and the concept of a
    per-concept file; None for a file that is not one (no ``__``, empty stem or concept, not ``.png``)."""
    stem, ext = posixpath.splitext(file_name)
    if ext != ".png":
        return None
    image, sep, concept = stem.rpartition(CONCEPT_SEPARATOR)
    if not sep or not image or not concept:
        return None
    return image, concept


def merge_concept_masks(masks: Sequence[np.ndarray], names: Sequence[str] | None = None) -> np.ndarray:
    """S(I) = max_k M_k(I) over masks of one size (for 0/255 masks: their union).

    Raises:
        ValueError: for no mask, or masks of different sizes (naming them when ``names`` is given).
    """
    if not masks:
        raise ValueError("no mask to merge")
    labels = list(names) if names is not None else [f"mask {i}" for i in range(len(masks))]
    if len(labels) != len(masks):
        raise ValueError(f"{len(masks)} masks but {len(labels)} names")
    for mask, label in zip(masks[1:], labels[1:], strict=True):
        if mask.shape != masks[0].shape:
            raise ValueError(f"{label} has shape {mask.shape}, {labels[0]} has {masks[0].shape}")
    return np.maximum.reduce([np.asarray(m, dtype=np.uint8) for m in masks])


def _is_concept_file_of(file_name: str, stem: str) -> bool:
    parsed = split_concept_file(file_name)
    return parsed is not None and parsed[0] == stem


def _png(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(values, dtype=np.uint8)).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


class MaskTreeReader:
    """Reads each image's mask files from a mask tree and returns the stored mask (8-bit PNG bytes).

    One reader serves one shard: every folder is listed once and the listing reused, since a shard's images share
    folders and finding the per-concept files of an image needs the folder's names (a stat per file would not).
    """

    def __init__(self, tree: MaskTree, mask_format: str = "binary") -> None:
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format {mask_format!r} is not one of {', '.join(MASK_FORMATS)}")
        self.tree = tree
        self.mask_format = mask_format
        self._listings: dict[str, frozenset[str]] = {}

    def _names(self, folder: str) -> frozenset[str]:
        if folder not in self._listings:
            path = posixpath.join(self.tree.base.rstrip("/"), folder) if folder else self.tree.base.rstrip("/")
            try:
                infos = self.tree.filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
            except OSError as err:
                raise RowSkipped(SkipReason.UNREADABLE, f"cannot list mask folder {folder or '.'}: {err}") from None
            self._listings[folder] = frozenset(i.base_name for i in infos if i.type == pafs.FileType.File)
        return self._listings[folder]

    def files(self, item_path: str, split: str) -> tuple[list[str], list[str]]:
        """The mask files of the image at ``item_path`` (relative to the tree; the whole-image mask first, then
        per-concept files sorted by name) at the first candidate location holding any, and every location tried."""
        tried = mask_candidates(item_path, split)
        for candidate in tried:
            folder, name = posixpath.split(candidate)
            stem = posixpath.splitext(name)[0]
            names = self._names(folder)
            concepts = sorted(n for n in names if _is_concept_file_of(n, stem))
            found = ([name] if name in names else []) + concepts
            if found:
                return [posixpath.join(folder, n) for n in found], tried
        return [], tried

    def mask(self, item: SourceItem, split: str, width: int, height: int) -> bytes:
        """The stored mask of ``item``: its files decoded, checked to be ``width`` x ``height`` and merged by max.

        Raises:
            RowSkipped: ``mask_missing`` (naming the paths tried), ``mask_invalid`` or ``mask_size_mismatch``
                (naming the file).
        """
        found, tried = self.files(item.path, split)
        if not found:
            raise RowSkipped(
                SkipReason.MASK_MISSING,
                f"no mask in the mask tree at {' or '.join(tried)} "
                f"(nor per-concept <stem>{CONCEPT_SEPARATOR}<concept>.png beside them)",
            )
        masks = []
        for path in found:
            try:
                values = decode_mask(read_source(self.tree.filesystem, self.tree.base, path), path, self.mask_format)
            except ImageDecodeError as err:
                raise RowSkipped(SkipReason.MASK_INVALID, err.detail) from None
            if values.shape != (height, width):
                raise RowSkipped(
                    SkipReason.MASK_SIZE_MISMATCH,
                    f"mask {path} is {values.shape[1]}x{values.shape[0]}, the image {width}x{height}",
                )
            masks.append(values)
        return _png(masks[0] if len(masks) == 1 else merge_concept_masks(masks, found))
