"""A brute-force minimum enclosing ball, the independent reference for ``robustfm.evals.metrics.divergence_radius``.

Exponential in the number of points: for tests on a handful of points only.
"""

from __future__ import annotations

import itertools

import numpy as np


def brute_force_enclosing_radius(points: np.ndarray) -> float:
    """Smallest ball enclosing ``points``: its boundary passes through some subset of at most dim+1 of them, and the
    centre of that subset's smallest circumscribed ball lies in their affine hull. Try every subset."""
    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    best = np.inf
    for size in range(1, min(n, points.shape[1] + 1) + 1):
        for subset in itertools.combinations(range(n), size):
            chosen = points[list(subset)]
            if size == 1:
                center = chosen[0]
            else:
                # Centre c = p0 + sum_i a_i (p_i - p0), equidistant to all chosen points.
                base = chosen[1:] - chosen[0]
                gram = base @ base.T
                if np.linalg.matrix_rank(base) < len(base):  # affinely dependent: a smaller subset covers it
                    continue
                coefficients = np.linalg.solve(2 * gram, (base * base).sum(axis=1))
                center = chosen[0] + coefficients @ base
            radius = np.linalg.norm(chosen - center, axis=1).max()
            if np.all(np.linalg.norm(points - center, axis=1) <= radius + 1e-9):
                best = min(best, radius)
    return float(best)
