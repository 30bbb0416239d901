"""Corruptions whose reference draws cannot be replayed (or are plain noise fields), compared by their statistics;
and a chi-square test that corruption names and severities are drawn as configured.

Each statistic of ours must be close to the reference's at the same severity, and much closer to it than the
reference's own statistic at the neighbouring severity is, so a wrong severity table fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _corruption_reference import photo, reference_output, to_tensor
from scipy import stats

from robustfm.corruptions import CORRUPTION_SETS, corrupt_batch, draw_corruption, make_draws
from robustfm.corruptions.digital import ELASTIC_ALPHA
from robustfm.corruptions.ops import gaussian_filter
from robustfm.seeding import sample_seed

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
SIZE = (96, 96)


@pytest.fixture(scope="session")
def photos() -> list[np.ndarray]:
    return [photo(name, *SIZE) for name in PHOTOS]


def _noise_std(out: np.ndarray, clean: np.ndarray) -> float:
    return float((out - clean).std())


def _impulse_fraction(out: np.ndarray, clean: np.ndarray) -> float:
    # Values set to 0 or 1 that were not already there.
    hit = ((out == 0) | (out == 1)) & (clean > 0) & (clean < 1)
    return float(hit.mean())


STATISTICS = {
    "gaussian_noise": _noise_std,
    "shot_noise": _noise_std,
    "speckle_noise": _noise_std,
    "impulse_noise": _impulse_fraction,
}


class StatCache:
    def __init__(self, images: list[np.ndarray]) -> None:
        self.images = images
        self.clean = np.stack([im.transpose(2, 0, 1) / 255 for im in images])
        self.values: dict[tuple[str, int], float] = {}

    def reference(self, name: str, severity: int) -> float:
        key = (name, severity)
        if key not in self.values:
            out = np.stack([reference_output(name, im, severity, seed=100 + i) for i, im in enumerate(self.images)])
            self.values[key] = STATISTICS[name](out, self.clean)
        return self.values[key]


@pytest.fixture(scope="session")
def stat_cache(photos) -> StatCache:
    return StatCache(photos)


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("name", sorted(STATISTICS))
def test_noise_statistics_match_the_reference(stat_cache: StatCache, name: str, severity: int):
    images = to_tensor(stat_cache.images)
    n = images.shape[0]
    ours = corrupt_batch(images, [name] * n, [severity] * n, list(range(n))).double().numpy()
    # Both sides quantise the input to uint8 first; ours works on the same uint8-valued floats.
    value = STATISTICS[name](ours, stat_cache.clean)
    expected = stat_cache.reference(name, severity)
    neighbour = stat_cache.reference(name, severity + 1 if severity < 5 else severity - 1)
    assert abs(value - expected) <= 0.05 * expected, f"{name} s{severity}: ours {value:.4f}, reference {expected:.4f}"
    assert abs(value - expected) < abs(neighbour - expected) / 4


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_elastic_displacement_magnitude_matches_the_reference(photos, severity: int):
    """Our drawn displacement fields have the reference's magnitude (mean |d| over many pixels)."""
    h, w = SIZE
    images = to_tensor(photos)
    gens = [torch.Generator().manual_seed(i) for i in range(len(photos))]
    raw = make_draws(images, "elastic_transform", severity, gens)["raw"].double()
    sigma = (h * 0.01, w * 0.01)
    ours = (gaussian_filter(raw, sigma, mode="reflect", truncate=3.0) * ELASTIC_ALPHA[severity - 1]).abs().mean()

    from skimage.filters import gaussian

    rng = np.random.RandomState(0)
    bound = h * 0.005
    ref_fields = [
        gaussian(rng.uniform(-bound, bound, size=(h, w)), sigma, mode="reflect", truncate=3)
        * ELASTIC_ALPHA[severity - 1]
        for _ in range(2 * len(photos))
    ]
    expected = float(np.mean([np.abs(f).mean() for f in ref_fields]))
    assert abs(float(ours) - expected) < 0.1 * expected
    # The raw draws stay within the reference bound (0.5% of the height).
    assert float(raw.abs().max()) <= bound + 1e-9


def test_draw_corruption_is_uniform_over_names_and_severities():
    names = CORRUPTION_SETS["seen"]
    draws = [draw_corruption(sample_seed(i, 0, "corruption", 7), names) for i in range(4500)]
    counts = np.zeros((len(names), 5))
    for name, severity in draws:
        counts[names.index(name), severity - 1] += 1
    # Joint cells (name x severity), uniform: expected 100 per cell.
    assert stats.chisquare(counts.ravel()).pvalue > 1e-3
    # Names and severities drawn independently.
    assert stats.chi2_contingency(counts).pvalue > 1e-3
    # The same seed always draws the same pair.
    assert draws[17] == draw_corruption(sample_seed(17, 0, "corruption", 7), names)


def test_draw_corruption_respects_a_configured_subset():
    names = ("fog", "snow", "frost")
    draws = [draw_corruption(seed, names, severities=(2, 4)) for seed in range(3000)]
    severities = np.array([s for _, s in draws])
    assert set(severities) == {2, 4}
    assert stats.chisquare([np.sum(severities == 2), np.sum(severities == 4)]).pvalue > 1e-3
    name_counts = [sum(n == name for n, _ in draws) for name in names]
    assert stats.chisquare(name_counts).pvalue > 1e-3
    # A skewed table would be caught: the same test rejects a 55/45 split of this size.
    assert stats.chisquare([1650, 1350]).pvalue < 1e-3
    with pytest.raises(ValueError, match="severity must be an integer in 1..5, got 0"):
        draw_corruption(0, names, severities=(0, 1))
    with pytest.raises(KeyError, match="unknown corruption 'smog'"):
        draw_corruption(0, ("smog",))
