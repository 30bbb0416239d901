"""A linear probe on image embeddings: fitted with balanced classes, saved, and applied unchanged elsewhere.

Paper 000's "CLIP + linear probe" baseline is a probe fitted on in-domain training images and tested on in-domain
test images and on out-of-domain sets as it is: refitting it on each set would measure that set's separability,
not transfer. The probe is a scikit-learn logistic regression; it travels between runs as a small ``.npz`` (weights,
intercept, regularisation), never as a pickle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class LinearProbe:
    """A fitted binary probe: P(positive) = sigmoid(embeddings @ weights + intercept)."""

    weights: np.ndarray
    intercept: float

    @classmethod
    def fit(cls, embeddings: np.ndarray, labels: np.ndarray, c: float = 1.0) -> LinearProbe:
        """L2-regularised logistic regression with balanced class weights: a 1:9 clean/corrupted training set would
        otherwise move the decision threshold towards the majority class."""
        from sklearn.linear_model import LogisticRegression

        labels = np.asarray(labels, dtype=np.int64)
        if len(np.unique(labels)) < 2:
            raise ValueError(f"a probe needs both classes to fit, got only {np.unique(labels).tolist()}")
        model = LogisticRegression(C=c, max_iter=2000, class_weight="balanced")
        model.fit(np.asarray(embeddings, dtype=np.float64), labels)
        return cls(model.coef_[0].astype(np.float64), float(model.intercept_[0]))

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """P(positive) for each row of ``embeddings``."""
        logits = np.asarray(embeddings, dtype=np.float64) @ self.weights + self.intercept
        return 1.0 / (1.0 + np.exp(-logits))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, weights=self.weights, intercept=np.asarray([self.intercept]))
        return path

    @classmethod
    def load(cls, path: str | Path, dim: int) -> LinearProbe:
        """Read a saved probe; ``dim`` is the embedding size it must fit (a probe of another model fails here)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no saved linear probe at {str(path)!r} (fit one first: probe mode 'fit')")
        with np.load(path, allow_pickle=False) as saved:
            weights, intercept = saved["weights"], float(saved["intercept"][0])
        if weights.shape != (dim,):
            raise ValueError(f"the probe at {str(path)!r} takes {weights.shape[0]}-d embeddings, these are {dim}-d")
        return cls(weights.astype(np.float64), intercept)
