"""Metric definitions (name, direction, meaning) and the numeric functions the suites aggregate with.

Everything here works on numpy arrays on the driver, after the actors have produced embeddings or scores, so each
function can be checked against an independent computation in the tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Direction = Literal["higher", "lower"]


@dataclass(frozen=True)
class MetricSpec:
    """What a metric family means and which way is better.

    Attributes:
        name: family name (``auroc``, ``recall_at_k``).
        direction: ``higher`` or ``lower`` is better; the report card marks the better model with it.
        definition: one sentence that goes into the protocol, so a number always travels with its definition.
    """

    name: str
    direction: Direction
    definition: str


class MetricTable:
    """Flat metrics ``{key: value}`` that each remember their :class:`MetricSpec`.

    Keys are ``/``-joined paths ending with the metric (``clean/top1``, ``image_to_text/recall_at_5``); the spec is
    passed explicitly on :meth:`add`, never guessed from the key.
    """

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.specs: dict[str, MetricSpec] = {}

    def add(self, key: str, value: float, spec: MetricSpec) -> None:
        """Record one value (NaN is kept: a metric undefined on this data, e.g. AUROC with one class)."""
        if key in self.values:
            raise ValueError(f"metric {key!r} recorded twice")
        self.values[key] = float(value)
        self.specs[key] = spec

    def directions(self) -> dict[str, Direction]:
        """``{key: "higher" | "lower"}`` for every recorded metric."""
        return {key: spec.direction for key, spec in self.specs.items()}


# --- binary detection -----------------------------------------------------------------------------------------------


def detection_metrics(
    labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5, balanced: bool = False
) -> dict[str, float]:
    """Accuracy, AUROC and F1 of scores P(positive) against 0/1 labels.

    Accuracy and F1 predict positive when ``score > threshold``; AUROC is NaN when only one class is present.
    ``balanced`` weighs every row by the inverse size of its class, so both classes count alike whatever their
    counts (accuracy becomes balanced accuracy; a detector that always says "positive" scores 0.5, not the positive
    share; AUROC does not change, it never depended on the class sizes).
    """
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    labels = np.asarray(labels, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    predicted = (scores > threshold).astype(np.int64)
    weights = None
    if balanced and len(np.unique(labels)) == 2:
        counts = np.bincount(labels, minlength=2).astype(np.float64)
        weights = 0.5 / counts[labels]
    auroc = float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else float("nan")
    return {
        "accuracy": float(accuracy_score(labels, predicted, sample_weight=weights)),
        "auroc": auroc,
        "f1": float(f1_score(labels, predicted, zero_division=0.0, sample_weight=weights)),
    }


def two_prompt_probability(
    image_embeddings: np.ndarray, negative: np.ndarray, positive: np.ndarray, logit_scale: float
) -> np.ndarray:
    """Zero-shot P(positive) from L2-normalized image embeddings and two normalized class text embeddings.

    The softmax over the two cosine logits (times CLIP's learned scale) is the sigmoid of their difference.
    """
    difference = image_embeddings @ (positive - negative)
    return 1.0 / (1.0 + np.exp(-logit_scale * difference))


# --- classification and retrieval -------------------------------------------------------------------------------------


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per row, whether ``labels`` is among the ``k`` highest logits (ties broken by the lower class index)."""
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    # A stable sort of -logits keeps the lower index first among equal logits, so results never depend on order.
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return (order == labels[:, None]).any(axis=1)


def recall_at_k(similarity: np.ndarray, relevant: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Recall@K of a retrieval: the share of queries with at least one relevant item among their top K.

    Args:
        similarity: [Q, G] query-to-gallery scores.
        relevant: [Q, G] boolean, True where the gallery item is a correct answer for the query.
        ks: cut-offs.
    """
    similarity = np.asarray(similarity, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    if similarity.shape != relevant.shape:
        raise ValueError(f"similarity {similarity.shape} and relevant {relevant.shape} must have the same shape")
    order = np.argsort(-similarity, axis=1, kind="stable")
    ranked_relevant = np.take_along_axis(relevant, order, axis=1)
    first_hit = np.where(ranked_relevant.any(axis=1), ranked_relevant.argmax(axis=1), similarity.shape[1])
    return {k: float(np.mean(first_hit < k)) for k in ks}


def revisited_average_precision(ranking: Sequence[int], positives: Sequence[int], junk: Sequence[int]) -> float:
    """Average precision of one query by the Revisited Oxford/Paris rules (Radenovic et al. 2018), not sklearn's.

    Junk images are taken out of the ranking (each positive moves up by the number of junk images above it); then
    every positive at 0-based rank r, the j-th positive found, adds the trapezoid between the precisions j/r
    (1 at r = 0) and (j+1)/(r+1), times the recall step 1/len(positives).

    Args:
        ranking: database indices, most similar first (every database image once).
        positives: the query's relevant database indices (Medium: easy + hard; Hard: hard).
        junk: indices that count neither way (Medium: junk; Hard: junk + easy).

    Returns:
        AP in [0, 1]; NaN for a query without positives (the protocol skips those).
    """
    if len(positives) == 0:
        return float("nan")
    ranking = np.asarray(ranking)
    positive_ranks = np.flatnonzero(np.isin(ranking, np.asarray(positives)))
    junk_ranks = np.flatnonzero(np.isin(ranking, np.asarray(junk)))
    shifted = positive_ranks - np.searchsorted(junk_ranks, positive_ranks)  # junk above each positive removed
    ap = 0.0
    for j, rank in enumerate(shifted):
        before = 1.0 if rank == 0 else j / rank
        at = (j + 1) / (rank + 1)
        ap += (before + at) / (2 * len(positives))
    return float(ap)


# --- embedding robustness (paper 004) -----------------------------------------------------------------------------


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64; zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


def cosine_to_reference(embeddings: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``embeddings`` [n, E] to ``reference`` [E]."""
    return normalize_rows(embeddings) @ normalize_rows(reference[None])[0]


def divergence_radius(points: np.ndarray, seed: int = 0) -> float:
    """Radius of the minimum enclosing ball of ``points`` [n, E] (Welzl's algorithm, ``miniball`` package).

    The suites pass L2-normalized embeddings, so the radius is in units of the unit sphere: 0 when every perturbed
    version embeds to the same direction, 1 at most for points on a hemisphere's boundary.
    """
    import miniball

    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or len(points) == 0:
        raise ValueError(f"divergence_radius needs a non-empty [n, dim] array, got shape {points.shape}")
    unique = np.unique(points, axis=0)
    if len(unique) == 1:
        return 0.0
    # Welzl works in the points' affine hull: project onto it so that the circumsphere systems stay square and
    # well conditioned even when dim (512) is far larger than the number of points (a sweep of ~10).
    origin = unique.mean(axis=0)
    _, singular, basis = np.linalg.svd(unique - origin, full_matrices=False)
    rank = int((singular > singular[0] * 1e-10).sum())
    coords = (unique - origin) @ basis[:rank].T
    center, squared_radius = miniball.get_bounding_ball(coords, epsilon=1e-9, rng=np.random.default_rng(seed))
    # miniball's tolerance can leave the ball a hair too small: take the farthest point from its centre.
    return float(max(np.sqrt(squared_radius), np.linalg.norm(coords - center, axis=1).max()))


def mean_of(values: Mapping[str, float] | Sequence[float]) -> float:
    """Mean ignoring NaN (NaN when every value is NaN or there are none)."""
    array = np.asarray(list(values.values()) if isinstance(values, Mapping) else list(values), dtype=np.float64)
    if array.size == 0 or np.isnan(array).all():
        return float("nan")
    return float(np.nanmean(array))


def mean_confidence_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two-sided t-interval of the mean, over seeds or paired differences; with one value the interval
    is the point itself (no interval can be claimed)."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, mean, mean
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return mean, mean - half, mean + half


def two_afc_correct(sim_left: np.ndarray, sim_right: np.ndarray, p_right: np.ndarray) -> np.ndarray:
    """Per 2AFC triplet, whether the model's pick agrees with the binarized human label (bool array).

    The model picks right iff ``sim_right > sim_left`` (similarities: cosines, or minus distances; a tie picks left,
    as perceptual-metrics decides); the label is right iff ``p_right > 0.5`` (an even split counts as left).
    """
    return (np.asarray(sim_right) > np.asarray(sim_left)) == (np.asarray(p_right) > 0.5)


def two_afc_soft_score(d_left: np.ndarray, d_right: np.ndarray, p_right: np.ndarray) -> np.ndarray:
    """Per 2AFC triplet, the share of judges the model agrees with (LPIPS' and DreamSim's score), from distances:
    ``(d_left < d_right)(1 - p) + (d_right < d_left) p + 0.5 [d_left == d_right]``."""
    d_left, d_right, p = (np.asarray(v, dtype=np.float64) for v in (d_left, d_right, p_right))
    return (d_left < d_right) * (1 - p) + (d_right < d_left) * p + 0.5 * (d_left == d_right)
