"""Every registered perturbation and geometric variant: shape, dtype, range, identity, sweep and determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustfm.perturbations import GEOMETRIC_VARIANTS, PERTURBATIONS, perturb, perturbation_meta, sweep
from robustfm.registry import UnknownNameError

ALL_NAMES = PERTURBATIONS.names() + GEOMETRIC_VARIANTS.names()
SIZE = 48


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Two real photos (scikit-image samples), 48 px, float [0,1] (2, 3, 48, 48)."""
    from skimage import data

    arrays = [data.astronaut(), data.chelsea()]
    tensors = [torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float().div(255) for a in arrays]
    return torch.stack([F.interpolate(t[None], size=(SIZE, SIZE), mode="area")[0] for t in tensors])


def test_registries_hold_the_documented_names():
    assert PERTURBATIONS.names() == sorted(
        [
            "jpeg_quality",
            "brightness",
            "contrast",
            "saturation",
            "hue",
            "sharpness",
            "gaussian_noise",
            "gaussian_blur",
            "downscale",
        ]
    )
    assert GEOMETRIC_VARIANTS.names() == sorted(["flip_h", "flip_v", "translate", "center_crop", "rotate", "scale"])


@pytest.mark.parametrize("name", ALL_NAMES)
def test_meta_documents_range_and_identity(name):
    meta = perturbation_meta(name)
    assert meta["low"] < meta["high"]
    assert isinstance(meta["description"], str) and len(meta["description"]) > 20
    if name in PERTURBATIONS:  # photometric sweeps pass through the clean image
        assert meta["low"] <= meta["identity"] <= meta["high"]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_shape_dtype_and_range_over_the_sweep(name, photos):
    for value in sweep(name, 4):
        out = perturb(photos, name, value, generator=torch.Generator().manual_seed(0))
        assert out.shape == photos.shape and out.dtype == photos.dtype
        assert torch.isfinite(out).all()
        assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("name", ALL_NAMES)
def test_identity_value_gives_the_input_back(name, photos):
    meta = perturbation_meta(name)
    out = perturb(photos, name, meta["identity"], generator=torch.Generator().manual_seed(0))
    error = (out - photos).abs()
    assert error.mean() <= meta["identity_atol"], f"{name}: mean error {error.mean():.2e} at the identity"
    if meta["identity_atol"] <= 1e-5:
        assert error.max() <= 1e-5


@pytest.mark.parametrize("name", ALL_NAMES)
def test_the_far_end_of_the_range_changes_the_image(name, photos):
    meta = perturbation_meta(name)
    far = meta["low"] if abs(meta["low"] - meta["identity"]) >= abs(meta["high"] - meta["identity"]) else meta["high"]
    out = perturb(photos, name, far, generator=torch.Generator().manual_seed(0))
    assert (out - photos).abs().mean() > 0.01, f"{name} at {far} barely changes the image"


@pytest.mark.parametrize("name", [n for n in ALL_NAMES if not n.startswith("flip")])
def test_a_small_step_from_identity_is_a_small_change(name, photos):
    """Continuity at the identity: 2% of the range away changes pixels far less than the far end does."""
    meta = perturbation_meta(name)
    step = 0.02 * (meta["high"] - meta["low"])
    value = meta["identity"] - step if meta["identity"] >= meta["high"] else meta["identity"] + step
    far = meta["low"] if abs(meta["low"] - meta["identity"]) >= abs(meta["high"] - meta["identity"]) else meta["high"]
    near_change = (perturb(photos, name, value, generator=torch.Generator().manual_seed(0)) - photos).abs().mean()
    far_change = (perturb(photos, name, far, generator=torch.Generator().manual_seed(0)) - photos).abs().mean()
    assert near_change < 0.3 * far_change, f"{name}: {value} changes {near_change:.4f}, {far} changes {far_change:.4f}"


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("n", [2, 3, 7])
def test_sweep_is_equally_spaced_with_exact_endpoints(name, n):
    meta = perturbation_meta(name)
    values = sweep(name, n)
    assert len(values) == n
    assert values[0] == meta["low"] and values[-1] == meta["high"]
    steps = np.diff(values)
    assert np.allclose(steps, (meta["high"] - meta["low"]) / (n - 1), rtol=1e-9, atol=1e-12)


def test_sweep_values_land_on_round_numbers():
    assert sweep("jpeg_quality", 10) == pytest.approx([10, 20, 30, 40, 50, 60, 70, 80, 90, 100])
    assert sweep("flip_h", 2) == [0.0, 1.0]
    assert sweep("rotate", 3) == [-45.0, 0.0, 45.0]


@pytest.mark.parametrize("n", [0, 1, -3, 2.5, True])
def test_sweep_rejects_bad_counts(n):
    with pytest.raises(ValueError, match="n must be an integer >= 2"):
        sweep("brightness", n)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_deterministic_given_the_generator_seed(name, photos):
    value = sweep(name, 3)[2]
    first = perturb(photos, name, value, generator=torch.Generator().manual_seed(7))
    second = perturb(photos, name, value, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, second)


def test_noise_depends_on_the_seed_and_per_image_generators_ignore_the_batch(photos):
    a = perturb(photos, "gaussian_noise", 0.1, generator=torch.Generator().manual_seed(1))
    b = perturb(photos, "gaussian_noise", 0.1, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a, b)
    gens = [torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]
    batch = perturb(photos, "gaussian_noise", 0.1, generator=gens)
    alone = perturb(photos[1:], "gaussian_noise", 0.1, generator=[torch.Generator().manual_seed(11)])
    assert torch.equal(batch[1:], alone)


def test_unknown_names_and_bad_inputs_are_explained(photos):
    with pytest.raises(UnknownNameError, match="did you mean 'brightness'"):
        perturb(photos, "brightnes", 1.0)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        perturb(photos[0], "brightness", 1.0)
    with pytest.raises(ValueError, match="finite"):
        perturb(photos, "brightness", math.nan)
    with pytest.raises(ValueError, match="2 generators for 1 images|1 generators for 2 images"):
        perturb(photos, "gaussian_noise", 0.1, generator=[torch.Generator()])
