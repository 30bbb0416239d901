"""Evaluation metrics against independent brute-force computations."""

from __future__ import annotations

import numpy as np
import pytest

from robustfm.evals.metrics import (
    MetricSpec,
    MetricTable,
    cosine_to_reference,
    detection_metrics,
    divergence_radius,
    recall_at_k,
    topk_correct,
    two_prompt_probability,
)
from robustfm.testing.enclosing_ball import brute_force_enclosing_radius


@pytest.mark.parametrize("dim,n", [(2, 5), (3, 6), (4, 5), (32, 5), (512, 4)])
def test_divergence_radius_matches_brute_force(dim, n):
    rng = np.random.default_rng(dim * 100 + n)
    for trial in range(5):
        points = rng.normal(size=(n, dim))
        if trial % 2:
            points /= np.linalg.norm(points, axis=1, keepdims=True)  # unit-sphere points, as the suite uses
        assert divergence_radius(points) == pytest.approx(brute_force_enclosing_radius(points), rel=1e-6, abs=1e-9)


def test_divergence_radius_known_shapes():
    assert divergence_radius(np.ones((4, 8))) == 0.0  # every version embeds identically
    assert divergence_radius(np.array([[0.0, 0.0], [2.0, 0.0]])) == pytest.approx(1.0)
    # An equilateral triangle of side 1 has circumradius 1/sqrt(3); its centroid point does not widen the ball.
    triangle = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2], [0.5, np.sqrt(3) / 6]])
    assert divergence_radius(triangle) == pytest.approx(1 / np.sqrt(3))
    with pytest.raises(ValueError, match="non-empty"):
        divergence_radius(np.zeros((0, 3)))


def test_recall_at_k_matches_loop():
    rng = np.random.default_rng(0)
    similarity = rng.normal(size=(7, 21))
    relevant = np.zeros((7, 21), dtype=bool)
    for query in range(7):
        relevant[query, rng.choice(21, size=3, replace=False)] = True
    got = recall_at_k(similarity, relevant, (1, 5, 10))
    for k in (1, 5, 10):
        hits = 0
        for query in range(7):
            top = sorted(range(21), key=lambda j: -similarity[query, j])[:k]
            hits += any(relevant[query, j] for j in top)
        assert got[k] == pytest.approx(hits / 7)


def test_topk_correct_matches_loop_and_breaks_ties_by_index():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(30, 8))
    labels = rng.integers(0, 8, size=30)
    for k in (1, 3, 5):
        expected = [labels[i] in np.argsort(-logits[i])[:k] for i in range(30)]
        assert topk_correct(logits, labels, k).tolist() == expected
    tied = np.zeros((1, 4))
    assert topk_correct(tied, np.array([0]), 1).tolist() == [True]
    assert topk_correct(tied, np.array([3]), 1).tolist() == [False]


def test_detection_metrics_against_hand_counts_and_pairwise_auroc():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.6, 0.4, 0.7, 0.45, 0.9, 0.55])
    got = detection_metrics(labels, scores, threshold=0.5)
    predicted = scores > 0.5
    tp = int((predicted & (labels == 1)).sum())
    fp = int((predicted & (labels == 0)).sum())
    fn = int((~predicted & (labels == 1)).sum())
    assert got["accuracy"] == pytest.approx((predicted == labels.astype(bool)).mean())
    assert got["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    pairs = [(p, q) for p in scores[labels == 1] for q in scores[labels == 0]]
    assert got["auroc"] == pytest.approx(np.mean([1.0 if p > q else 0.5 if p == q else 0.0 for p, q in pairs]))
    assert np.isnan(detection_metrics(np.zeros(3), np.array([0.1, 0.2, 0.3]))["auroc"])


def test_two_prompt_probability_is_the_two_way_softmax():
    rng = np.random.default_rng(2)
    images = rng.normal(size=(5, 6))
    negative, positive = rng.normal(size=6), rng.normal(size=6)
    logits = np.stack([images @ negative, images @ positive], axis=1) * 50.0
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    assert two_prompt_probability(images, negative, positive, 50.0) == pytest.approx(softmax[:, 1])


def test_cosine_to_reference():
    embeddings = np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    assert cosine_to_reference(embeddings, np.array([2.0, 0.0])).tolist() == pytest.approx([1.0, 0.0, -1.0])


def test_metric_table_keeps_directions_and_refuses_duplicates():
    table = MetricTable()
    table.add("a/auroc", 0.5, MetricSpec("auroc", "higher", "x"))
    table.add("b/radius", 0.1, MetricSpec("radius", "lower", "y"))
    assert table.directions() == {"a/auroc": "higher", "b/radius": "lower"}
    with pytest.raises(ValueError, match="twice"):
        table.add("a/auroc", 0.4, MetricSpec("auroc", "higher", "x"))
