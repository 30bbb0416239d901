"""Each edit does what its name says, more strongly as its parameter moves away from the identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustfm.perturbations import perturb, sweep

SIZE = 64


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    from skimage import data

    arrays = [data.astronaut(), data.coffee()]
    tensors = [torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float().div(255) for a in arrays]
    return torch.stack([F.interpolate(t[None], size=(SIZE, SIZE), mode="area")[0] for t in tensors])


def high_frequency_energy(images: torch.Tensor) -> float:
    """Mean squared difference between neighbouring pixels: falls under blur, rises with sharpening and noise."""
    dx = images[..., :, 1:] - images[..., :, :-1]
    dy = images[..., 1:, :] - images[..., :-1, :]
    return float(dx.pow(2).mean() + dy.pow(2).mean())


def chroma(images: torch.Tensor) -> float:
    return float((images.amax(dim=1) - images.amin(dim=1)).mean())


def distance_to(reference: torch.Tensor):
    return lambda images: float((images - reference).abs().mean())


def _values_and_scores(photos, name, values, score):
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    return [score(perturb(photos, name, v, generator=gen())) for v in values]


def _strictly_increasing(scores):
    return all(b > a for a, b in zip(scores, scores[1:], strict=False))


@pytest.mark.parametrize(
    ("name", "values", "score_name"),
    [
        ("brightness", sweep("brightness", 5), "mean"),
        ("contrast", sweep("contrast", 5), "std"),
        ("saturation", sweep("saturation", 5), "chroma"),
        ("sharpness", sweep("sharpness", 5), "hf"),
        ("downscale", sweep("downscale", 5), "hf"),
        ("gaussian_noise", sweep("gaussian_noise", 5), "distance"),
        ("hue", [0.0, 0.1, 0.2, 0.3, 0.5], "distance"),
        ("jpeg_quality", [10, 30, 60, 90], "closeness"),
        ("center_crop", [0.9, 0.8, 0.7, 0.6], "distance"),
        ("rotate", [0.0, 10.0, 25.0, 45.0], "distance"),
        ("translate", [0.0, 0.05, 0.1, 0.2], "distance"),
    ],
)
def test_effect_grows_along_the_parameter(photos, name, values, score_name):
    scores = {
        "mean": lambda x: float(x.mean()),
        "std": lambda x: float(x.std()),
        "chroma": chroma,
        "hf": high_frequency_energy,
        "distance": distance_to(photos),
        "closeness": lambda x: -float((x - photos).abs().mean()),
    }
    result = _values_and_scores(photos, name, values, scores[score_name])
    assert _strictly_increasing(result), f"{name}: {score_name} over {values} is {result}"


def test_blur_removes_high_frequencies(photos):
    energies = _values_and_scores(photos, "gaussian_blur", sweep("gaussian_blur", 5), high_frequency_energy)
    assert all(b < a for a, b in zip(energies, energies[1:], strict=False)), energies
    assert energies[-1] < 0.25 * energies[0]


def test_noise_has_the_documented_standard_deviation():
    gray = torch.full((4, 3, 64, 64), 0.5)  # far from the clipping bounds
    out = perturb(gray, "gaussian_noise", 0.1, generator=torch.Generator().manual_seed(0))
    assert float((out - gray).std()) == pytest.approx(0.1, rel=0.03)
    assert float((out - gray).mean()) == pytest.approx(0.0, abs=0.003)


def test_saturation_zero_is_grayscale_and_brightness_scales_pixels(photos):
    gray = perturb(photos, "saturation", 0.0)
    assert torch.allclose(gray[:, 0], gray[:, 1], atol=1e-6) and torch.allclose(gray[:, 1], gray[:, 2], atol=1e-6)
    dark = perturb(photos, "brightness", 0.5)
    assert torch.allclose(dark, photos * 0.5)


def test_hue_half_turn_twice_is_the_identity(photos):
    twice = perturb(perturb(photos, "hue", 0.5), "hue", 0.5)
    assert (twice - photos).abs().max() < 1e-4
    assert (perturb(photos, "hue", 0.5) - photos).abs().mean() > 0.05


def test_flips_are_mirror_images_and_their_own_inverse(photos):
    assert torch.equal(perturb(photos, "flip_h", 1), photos.flip(-1))
    assert torch.equal(perturb(photos, "flip_v", 1), photos.flip(-2))
    assert torch.equal(perturb(perturb(photos, "flip_h", 1), "flip_h", 1), photos)


def test_translate_moves_content_by_whole_pixels(photos):
    out = perturb(photos, "translate", 0.125)  # 8 px right and down at 64 px
    assert torch.equal(out[..., 8:, 8:], photos[..., :-8, :-8])
    assert out[..., :8, :].abs().max() == 0 and out[..., :, :8].abs().max() == 0
    back = perturb(photos, "translate", -0.125)
    assert torch.equal(back[..., :-8, :-8], photos[..., 8:, 8:])


def test_scale_leaves_the_documented_black_border(photos):
    out = perturb(photos, "scale", 0.5)  # a 32 px image centred on a 64 px canvas
    inside = out[..., 16:48, 16:48]
    expected = F.interpolate(photos, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    assert (inside - expected.clamp(0, 1)).abs().max() < 1e-5
    border = out.clone()
    border[..., 16:48, 16:48] = 0
    assert border.abs().max() == 0


def test_center_crop_zooms_into_the_centre(photos):
    out = perturb(photos, "center_crop", 0.25)  # outside the sweep range on purpose: an exact half-side crop
    expected = F.interpolate(photos[..., 16:48, 16:48], size=(64, 64), mode="bilinear", align_corners=False)
    assert (out - expected).abs().mean() < 1e-5


def test_rotation_by_the_range_end_has_black_corners(photos):
    out = perturb(photos, "rotate", 45.0)
    assert out[..., :4, :4].abs().max() == 0 and out[..., -4:, -4:].abs().max() == 0
    centre = (out[..., 28:36, 28:36] - photos[..., 28:36, 28:36]).abs().mean()
    assert centre < (out - photos).abs().mean()


def test_jpeg_runs_on_the_device_of_its_input_and_keeps_dtype(photos):
    out = perturb(photos.double(), "jpeg_quality", 50)
    assert out.dtype == torch.float64 and out.device == photos.device
    # Decoded JPEG lands on the 8-bit grid.
    assert torch.allclose(out * 255, (out * 255).round(), atol=1e-6)
