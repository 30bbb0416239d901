"""Corruption detection measured as paper 000 measures it: balanced clean-vs-corrupted subsets, and a linear probe
fitted in domain and applied unchanged out of domain. The suite's aggregation on hand-made rows, without Ray."""

from __future__ import annotations

import numpy as np
import pytest

from robustfm.config import load_config
from robustfm.evals.config import EvalConfig

SEEN = ["gaussian_noise", "shot_noise", "motion_blur"]
UNSEEN = ["impulse_noise"]
DIM = 8


def _suite(**section: str):
    from robustfm.evals.suites.corruption_detection import CorruptionDetectionSuite

    cfg = load_config(EvalConfig, overrides=[f"suites.corruption_detection.{k}={v}" for k, v in section.items()])
    return CorruptionDetectionSuite(cfg)


def _params() -> dict:
    return {
        "corruptions": SEEN + UNSEEN,
        "severities": [3],
        "sets": {"seen": SEEN, "unseen": UNSEEN},
        "probe_train_corruptions": SEEN,
        "clean_prompts": ["c"],
        "corrupt_prompts": ["x"],
    }


def _rows(images: int, p_corrupt: float | None, seed: int = 0, shift: float = 2.0) -> dict[str, np.ndarray]:
    """One clean and one corrupted row per image and corruption; corrupted embeddings are shifted along axis 0."""
    rng = np.random.default_rng(seed)
    ids, corruption, embeddings = [], [], []
    for i in range(images):
        for name in ["clean", *SEEN, *UNSEEN]:
            ids.append(f"img-{seed}-{i:03d}")
            corruption.append(name)
            vector = rng.normal(size=DIM)
            if name != "clean":
                vector[0] += shift
            embeddings.append(vector)
    n = len(ids)
    scores = np.full(n, p_corrupt) if p_corrupt is not None else rng.random(n)
    return {
        "id": np.asarray(ids, dtype=object),
        "corruption": np.asarray(corruption, dtype=object),
        "severity": np.full(n, 3),
        "embedding": np.asarray(embeddings, dtype=np.float32),
        "p_corrupt": scores,
    }


def test_an_always_corrupted_detector_scores_half_balanced_accuracy_on_the_seen_set():
    """The seen subset holds 3 corrupted rows per clean one: unweighted accuracy would be 0.75 and F1 0.857."""
    metrics = _suite().aggregate(_rows(40, p_corrupt=1.0), _params()).metrics.values
    assert metrics["zero_shot/set/seen/accuracy"] == pytest.approx(0.5)
    assert metrics["zero_shot/all/accuracy"] == pytest.approx(0.5)
    assert metrics["zero_shot/corruption/shot_noise/accuracy"] == pytest.approx(0.5)  # balanced by construction
    # F1 with the clean rows weighted up: precision 0.5, recall 1.
    assert metrics["zero_shot/set/seen/f1"] == pytest.approx(2 / 3)


def test_the_probe_fitted_in_domain_is_applied_unchanged_out_of_domain(tmp_path):
    from robustfm.evals.probe import LinearProbe

    path = tmp_path / "probe.npz"
    in_domain, out_of_domain = _rows(30, None, seed=0), _rows(20, None, seed=1, shift=1.0)
    fitted = _suite(probe="fit", probe_path=str(path)).aggregate(in_domain, _params())
    assert path.is_file()
    assert not any(key.startswith("probe/") for key in fitted.metrics.values)  # training-set numbers are not reported

    loaded = _suite(probe="load", probe_path=str(path)).aggregate(out_of_domain, _params()).metrics.values
    seen = np.isin(out_of_domain["corruption"], ["clean", *SEEN])
    expected_scores = LinearProbe.load(path, DIM).predict(out_of_domain["embedding"][seen])
    labels = (out_of_domain["corruption"][seen] != "clean").astype(int)
    from robustfm.evals.metrics import detection_metrics

    expected = detection_metrics(labels, expected_scores, balanced=True)
    assert loaded["probe/set/seen/auroc"] == pytest.approx(expected["auroc"])
    assert loaded["probe/set/seen/accuracy"] == pytest.approx(expected["accuracy"])
    # Refitting on the out-of-domain images themselves (the old protocol) gives other numbers: it measures
    # separability of that set, not transfer.
    refit = _suite().aggregate(out_of_domain, _params()).metrics.values
    assert refit["probe/set/seen/auroc"] != pytest.approx(loaded["probe/set/seen/auroc"])


def test_the_probe_is_fitted_with_balanced_classes():
    from sklearn.linear_model import LogisticRegression

    from robustfm.evals.probe import LinearProbe

    rng = np.random.default_rng(3)
    clean, corrupted = rng.normal(size=(40, 2)), rng.normal(size=(360, 2)) + [1.0, 0.0]
    x, y = np.concatenate([clean, corrupted]), np.r_[np.zeros(40), np.ones(360)]
    probe = LinearProbe.fit(x, y)
    false_alarms, misses = float((probe.predict(clean) > 0.5).mean()), float((probe.predict(corrupted) <= 0.5).mean())
    # With balanced classes the 0.5 threshold sits between the two clouds: both errors about P(N(0,1) > 0.5) = 0.31.
    assert abs(false_alarms - misses) < 0.15 and false_alarms < 0.45
    # Unweighted (1:9), the threshold moves into the clean cloud and most clean images are called corrupted.
    unweighted = LogisticRegression(max_iter=2000).fit(x, y)
    assert float((unweighted.predict_proba(clean)[:, 1] > 0.5).mean()) > false_alarms + 0.2


def test_probe_modes_need_a_path_and_a_matching_model(tmp_path):
    from robustfm.config import ConfigError
    from robustfm.evals.probe import LinearProbe

    with pytest.raises(ConfigError, match="probe_path"):
        _suite(probe="load")
    LinearProbe(np.zeros(4), 0.0).save(tmp_path / "p.npz")
    with pytest.raises(ValueError, match="takes 4-d embeddings, these are 8-d"):
        LinearProbe.load(tmp_path / "p.npz", 8)
