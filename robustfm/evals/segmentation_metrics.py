"""Relevance maps scored as foreground segmentations: the ImageNet-Segmentation protocol of Chefer et al.

Transformer-Explainability's ``imagenet_seg_eval.py`` (spec §1.3 "seg protocol"; paper 001 Table 3) reads a relevance
map as a two-class segmentation of the image:

- the map, upsampled to the image and min-max normalised, is thresholded at its own mean: ``fg = map > mean(map)``;
- pixel accuracy and the IoU of each class (background, foreground) are accumulated over the whole set: the sums of
  correct pixels, of intersections and of unions over all images, divided at the end (so large images weigh more
  than in a mean of per-image scores); mIoU is the mean of the two classes' IoU;
- AP is per image: the average precision of the flattened one-hot ``[bg, fg]`` targets against the scores
  ``[1 - map, map]``, then the mean over images (mAP).

The per-image parts (:func:`segmentation_counts`, :func:`one_hot_average_precision`) run in the scoring actors; the
set-level sums (:func:`segmentation_summary`) on the driver, so results do not depend on how images were batched.
:func:`average_precision` is sklearn's ``average_precision_score`` for binary targets, written out so that the tests
can hold it against sklearn itself. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Class order of the two-class segmentation (index 0 background, 1 foreground), as in the reference code.
SEG_CLASSES = ("background", "foreground")


@dataclass(frozen=True)
class SegmentationCounts:
    """Per-image counts of the two-class segmentation, summed over a set by :func:`segmentation_summary`.

    Attributes:
        correct: ``(N,)`` pixels whose predicted class equals the mask's.
        pixels: ``(N,)`` pixels of each image.
        intersection: ``(N, 2)`` per class (bg, fg): pixels predicted and labelled that class.
        union: ``(N, 2)`` per class: pixels predicted or labelled that class.
    """

    correct: np.ndarray
    pixels: np.ndarray
    intersection: np.ndarray
    union: np.ndarray


def foreground_at_mean(maps: np.ndarray) -> np.ndarray:
    """``(N, H, W)`` bool: each map above its own mean (the reference code's ``Res.gt(Res.mean())``)."""
    maps = np.asarray(maps, dtype=np.float64)
    return maps > maps.reshape(len(maps), -1).mean(axis=1)[:, None, None]


def segmentation_counts(maps: np.ndarray, masks: np.ndarray) -> SegmentationCounts:
    """Counts of the mean-thresholded ``maps`` ``(N, H, W)`` against {0,1} ``masks`` ``(N, H, W)``."""
    maps, masks = _checked(maps, masks)
    predicted = foreground_at_mean(maps)
    truth = masks > 0.5
    flat_p, flat_t = predicted.reshape(len(maps), -1), truth.reshape(len(maps), -1)
    inter = np.stack([(~flat_p & ~flat_t).sum(1), (flat_p & flat_t).sum(1)], axis=1)
    union = np.stack([(~flat_p | ~flat_t).sum(1), (flat_p | flat_t).sum(1)], axis=1)
    correct = (flat_p == flat_t).sum(1)
    pixels = np.full(len(maps), flat_t.shape[1], dtype=np.int64)
    return SegmentationCounts(correct.astype(np.int64), pixels, inter.astype(np.int64), union.astype(np.int64))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of ``scores`` for binary ``labels``: sum over the distinct thresholds, highest first, of
    (recall gained) x (precision there) — sklearn's step-wise definition, no interpolation. NaN without positives.
    """
    labels = np.asarray(labels, dtype=np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must have the same shape")
    positives = labels.sum()
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    ranked_scores, ranked_labels = scores[order], labels[order]
    # Tied scores form one threshold: only the last position of each run of equal scores is a point of the curve.
    last_of_run = np.r_[np.flatnonzero(np.diff(ranked_scores)), len(ranked_scores) - 1]
    true_positives = np.cumsum(ranked_labels)[last_of_run]
    precision = true_positives / (last_of_run + 1)
    recall_gain = np.diff(np.r_[0.0, true_positives]) / positives
    return float((recall_gain * precision).sum())


def one_hot_average_precision(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``(N,)`` AP of each image: one-hot ``[1 - mask, mask]`` flattened against ``[1 - map, map]`` flattened.

    Both channels enter one ranking (the reference code flattens them together): a perfect map scores 1, and even
    an all-zero map (a degenerate one) scores well above 0, since it ranks every background-channel entry first.
    """
    maps, masks = _checked(maps, masks)
    out = np.empty(len(maps), dtype=np.float64)
    for index, (scores, truth) in enumerate(zip(maps, masks, strict=True)):
        truth = (truth > 0.5).astype(np.float64).ravel()
        scores = scores.ravel()
        out[index] = average_precision(np.r_[1.0 - truth, truth], np.r_[1.0 - scores, scores])
    return out


def segmentation_summary(
    correct: np.ndarray, pixels: np.ndarray, intersection: np.ndarray, union: np.ndarray, ap: np.ndarray
) -> dict[str, float]:
    """Set-level scores from per-image counts: ``pixel_accuracy``, ``iou_background``, ``iou_foreground``, ``miou``
    (sums over the set, then divided) and ``map`` (mean of the per-image APs). NaN for an empty set."""
    if len(pixels) == 0:
        return {k: float("nan") for k in ("pixel_accuracy", "iou_background", "iou_foreground", "miou", "map")}
    inter = np.asarray(intersection, dtype=np.float64).sum(0)
    uni = np.asarray(union, dtype=np.float64).sum(0)
    iou = np.where(uni > 0, inter / np.where(uni > 0, uni, 1.0), np.nan)
    return {
        "pixel_accuracy": float(np.sum(correct) / np.sum(pixels)),
        "iou_background": float(iou[0]),
        "iou_foreground": float(iou[1]),
        "miou": float(np.nanmean(iou)) if not np.isnan(iou).all() else float("nan"),
        "map": float(np.mean(ap)),
    }


def _checked(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks)
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} must both be (N, H, W)")
    return maps, masks
