"""Every registered corruption x severity: shape, dtype, range, determinism, seeds, sizes, batch independence."""

from __future__ import annotations

import pytest
import torch

from robustfm.corruptions import (
    CORRUPTION_SETS,
    CORRUPTIONS,
    SEVERITIES,
    FrostImagesMissingError,
    corrupt,
    corrupt_batch,
    corruption_set,
    make_draws,
)
from robustfm.registry import UnknownNameError

CASES = [(name, severity) for name in CORRUPTIONS.names() for severity in SEVERITIES]
SEEDS = [11, 22, 33]


def _images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Smooth-ish content plus texture, so every corruption (blurs included) visibly changes it.
    base = torch.rand((n, 3, h // 4 + 1, w // 4 + 1), generator=g)
    smooth = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    return (0.7 * smooth + 0.3 * torch.rand((n, 3, h, w), generator=g)).clamp(0, 1)


def test_registry_holds_the_19_corruptions_and_the_named_sets():
    assert len(CORRUPTIONS) == 19
    assert set(CORRUPTIONS.names()) == set(CORRUPTION_SETS["all"])
    assert len(CORRUPTION_SETS["imagenet_c"]) == 15 and len(set(CORRUPTION_SETS["imagenet_c"])) == 15
    assert set(CORRUPTION_SETS["seen"]).isdisjoint(CORRUPTION_SETS["unseen"])
    assert len(CORRUPTION_SETS["seen"]) == 9 and len(CORRUPTION_SETS["unseen"]) == 7
    for name in CORRUPTIONS.names():
        table = CORRUPTIONS.meta(name)["severities"]
        assert len(table) == 5 and table == CORRUPTIONS.get(name).severities
    with pytest.raises(KeyError, match="did you mean 'seen'"):
        corruption_set("sene")


@pytest.mark.parametrize(("name", "severity"), CASES)
def test_corruption_contract(name: str, severity: int):
    images = _images(3, 32, 32)
    out = corrupt_batch(images, [name] * 3, [severity] * 3, SEEDS)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert (out - images).abs().mean() > 1e-3, "the corruption left the images unchanged"

    again = corrupt_batch(images, [name] * 3, [severity] * 3, SEEDS)
    assert torch.equal(out, again), "same seeds must give the same output"

    other = corrupt_batch(images, [name] * 3, [severity] * 3, [s + 1000 for s in SEEDS])
    if CORRUPTIONS.get(name).is_random:
        assert not torch.allclose(out, other), "a different seed must give a different output"
    else:
        assert torch.equal(out, other)

    # Batch independence: a sample's output does not depend on the rest of its batch.
    alone = corrupt_batch(images[1:2], [name], [severity], SEEDS[1:2])
    torch.testing.assert_close(alone, out[1:2], atol=1e-5, rtol=0)

    for h, w in ((40, 72), (5, 3), (1, 1)):  # other sizes, not square, down to a single pixel
        other_size = _images(2, h, w, seed=1)
        out_other = corrupt_batch(other_size, [name] * 2, [severity] * 2, SEEDS[:2])
        assert out_other.shape == other_size.shape and out_other.min() >= 0 and out_other.max() <= 1
        assert torch.isfinite(out_other).all()


def test_mixed_batch_matches_per_sample_calls():
    images = _images(4, 32, 48)
    names = ["fog", "glass_blur", "fog", "contrast"]
    severities = [2, 5, 4, 1]
    seeds = [5, 6, 7, 8]
    out = corrupt_batch(images, names, severities, seeds)
    for i in range(4):
        g = [torch.Generator().manual_seed(seeds[i])]
        expected = corrupt(images[i : i + 1], names[i], severities[i], g)
        torch.testing.assert_close(out[i : i + 1], expected, atol=1e-6, rtol=0)


def test_injected_draws_replace_the_generators():
    images = _images(2, 32, 32)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    draws = make_draws(images, "motion_blur", 3, gens)
    assert draws["angle"].shape == (2,) and (draws["angle"].abs() <= 45).all()
    via_draws = corrupt(images, "motion_blur", 3, draws=draws)
    via_generators = corrupt(images, "motion_blur", 3, [torch.Generator().manual_seed(s) for s in (1, 2)])
    assert torch.equal(via_draws, via_generators)
    flipped = corrupt(images, "motion_blur", 3, draws={"angle": -draws["angle"]})
    assert not torch.allclose(flipped, via_draws)


def test_bad_inputs_fail_with_clear_messages():
    images = _images(2, 32, 32)
    with pytest.raises(UnknownNameError, match="did you mean 'gaussian_noise'"):
        corrupt(images, "gausian_noise", 1)
    with pytest.raises(ValueError, match="severity must be an integer in 1..5, got 6"):
        corrupt(images, "fog", 6)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        corrupt(images[:, :1], "fog", 1)
    with pytest.raises(ValueError, match="floating point"):
        corrupt((images * 255).to(torch.uint8), "fog", 1)
    with pytest.raises(ValueError, match="one name, severity and seed per image"):
        corrupt_batch(images, ["fog"], [1, 2], [0, 1])
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        corrupt(images, "fog", 1, [torch.Generator() for _ in range(3)])


def test_frost_without_its_images_says_how_to_get_them(tmp_path, monkeypatch):
    from robustfm.corruptions import weather

    monkeypatch.setenv("ROBUSTFM_FROST_DIR", str(tmp_path))
    weather._frost_photo.cache_clear()
    weather._frost_rescaled_shape.cache_clear()
    weather.frost_layer.cache_clear()
    try:
        with pytest.raises(FrostImagesMissingError, match="pip install imagecorruptions"):
            corrupt_batch(_images(1, 32, 32), ["frost"], [1], [0])
    finally:
        weather._frost_photo.cache_clear()
        weather._frost_rescaled_shape.cache_clear()
        weather.frost_layer.cache_clear()


def test_motion_blur_gpu_path_equals_the_cpu_path():
    from robustfm.corruptions.ops import _motion_blur_gather, motion_blur_batch

    images = _images(3, 32, 40)
    angles = torch.tensor([-44.0, 3.5, 30.0], dtype=torch.float64)
    for radius, sigma in ((10, 3), (20, 15)):  # the second reaches past a 32 px image: taps are dropped
        torch.testing.assert_close(
            _motion_blur_gather(images, radius, sigma, angles), motion_blur_batch(images, radius, sigma, angles)
        )
