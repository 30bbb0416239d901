"""Pixel parity with imagecorruptions 1.1.2 on real photos, for every corruption without randomness or with draws
that can be replayed, at every severity.

Each case asserts (a) our output is within a per-corruption tolerance of the reference and (b) that tolerance is at
most a tenth of the reference's own distance between this severity and the next (the previous for 5), so a wrong
severity table cannot pass. References are computed once per session.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _corruption_reference import photo, reference_draws, reference_output, to_tensor

from robustfm.corruptions import CORRUPTIONS, corrupt
from robustfm.corruptions.ops import boundary_index

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
SIZE = (64, 80)  # (H, W): small enough for the reference's glass_blur, not square
DETERMINISTIC = (
    "defocus_blur", "zoom_blur", "gaussian_blur", "pixelate", "jpeg_compression", "brightness", "contrast", "saturate",
)  # fmt: skip
INJECTED = ("motion_blur", "glass_blur", "fog", "frost", "spatter", "snow", "elastic_transform")
# Mean and max absolute difference allowed, in [0, 1] units. pixelate: the reference rounds its BOX
# downsampling to uint8, we keep floats. glass_blur: the uint8 truncation of a value within float rounding of a
# grey level may differ (see robustfm/corruptions/blur.py).
TOLERANCE = {name: (1e-5, 1e-4) for name in DETERMINISTIC + INJECTED}
TOLERANCE["pixelate"] = (0.6 / 255, 1.0 / 255 + 1e-6)
TOLERANCE["glass_blur"] = (2e-4, 0.02)
# frost: torch's bicubic and OpenCV's fixed-point bicubic round the resized frost photo one grey level apart on a
# few pixels (times the frost weight <= 0.75).
TOLERANCE["frost"] = (2e-5, 1.0 / 255)


class ReferenceCache:
    """The photos, and the reference's outputs and replayed draws, computed on first use and kept for the session."""

    def __init__(self) -> None:
        self.images = {name: photo(name, *SIZE) for name in PHOTOS}
        self.outputs: dict[tuple[str, int], np.ndarray] = {}
        self.draws: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    def output(self, name: str, severity: int) -> np.ndarray:
        key = (name, severity)
        if key not in self.outputs:
            self.outputs[key] = np.stack(
                [reference_output(name, img, severity, seed=i) for i, img in enumerate(self.images.values())]
            )
        return self.outputs[key]

    def replayed(self, name: str, severity: int) -> dict[str, torch.Tensor]:
        key = (name, severity)
        if key not in self.draws:
            per = [reference_draws(name, img, severity, seed=i) for i, img in enumerate(self.images.values())]
            self.draws[key] = {k: torch.stack([d[k] for d in per]) for k in per[0]}
        return self.draws[key]

    def batch(self) -> torch.Tensor:
        return to_tensor(list(self.images.values()))


@pytest.fixture(scope="session")
def reference() -> ReferenceCache:
    return ReferenceCache()


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("name", DETERMINISTIC + INJECTED)
def test_pixel_parity(reference: ReferenceCache, name: str, severity: int):
    expected = reference.output(name, severity)
    draws = reference.replayed(name, severity) if CORRUPTIONS.get(name).is_random else None
    ours = corrupt(reference.batch(), name, severity, draws=draws).double().numpy()
    diff = np.abs(ours - expected)
    mean_tol, max_tol = TOLERANCE[name]
    assert diff.mean() <= mean_tol and diff.max() <= max_tol, (
        f"{name} severity {severity}: mean |diff| {diff.mean():.2e} (allowed {mean_tol:.1e}), "
        f"max {diff.max():.2e} (allowed {max_tol:.1e})"
    )
    neighbour = severity + 1 if severity < 5 else severity - 1
    gap = np.abs(reference.output(name, neighbour) - expected).mean()
    assert mean_tol <= gap / 10, f"{name}: tolerance {mean_tol:.1e} is not well below the severity gap {gap:.2e}"
    # Our output is also much closer to the reference at this severity than to the neighbouring one.
    assert diff.mean() < np.abs(ours - reference.output(name, neighbour)).mean() / 10


def test_plasma_fractal_matches_the_reference_stream():
    from _imagecorruptions_compat import load_reference

    from robustfm.corruptions.weather import plasma_fractal, plasma_uniform_count

    ref = load_reference()
    expected = []
    for seed in (3, 4):
        np.random.seed(seed)
        expected.append(ref.plasma_fractal(mapsize=64, wibbledecay=1.7))
    uniforms = []
    for seed in (3, 4):
        np.random.seed(seed)
        uniforms.append(np.random.random_sample(plasma_uniform_count(64)))
    ours = plasma_fractal(64, 1.7, torch.from_numpy(np.stack(uniforms)))
    np.testing.assert_allclose(ours.numpy(), np.stack(expected), atol=1e-12)


def test_frost_layer_matches_opencv_resize():
    from _corruption_reference import frost_resized_reference

    from robustfm.corruptions.weather import frost_layer

    for index in range(5):
        expected = frost_resized_reference(index, 700, 400).astype(np.float64)  # wider than every photo: upscaled
        ours = frost_layer(index, 700, 400).permute(1, 2, 0).double().numpy()
        assert ours.shape == expected.shape
        diff = np.abs(ours - expected)
        assert diff.max() <= 2 and diff.mean() < 0.1, (index, diff.max(), diff.mean())


@pytest.mark.parametrize("mode", ["nearest", "reflect", "mirror"])
def test_boundary_index_matches_numpy_pad(mode: str):
    numpy_mode = {"nearest": "edge", "reflect": "symmetric", "mirror": "reflect"}[mode]
    for size in (1, 2, 5):
        for pad in (0, 3, 12):
            if size == 1 and mode != "nearest":
                continue
            expected = np.pad(np.arange(size), (pad, pad + 1), mode=numpy_mode)
            np.testing.assert_array_equal(boundary_index(size, pad, pad + 1, mode), expected)


@pytest.mark.parametrize("name", ["brightness", "saturate", "contrast"])
def test_hsv_corner_cases_match_the_reference(name: str):
    """Black, grey, white and saturated pixels (hue and saturation undefined or extreme) follow scikit-image's HSV."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    image[:8, :8] = 0  # black
    image[8:16, :8] = 128  # grey
    image[16:24, :8] = 255  # white
    image[24:, :8] = (255, 0, 0)  # pure red
    image[:8, 8:16] = (0, 40, 255)
    for severity in range(1, 6):
        expected = reference_output(name, image, severity)
        ours = corrupt(to_tensor([image]), name, severity)[0].double().numpy()
        np.testing.assert_allclose(ours, expected, atol=1e-5, err_msg=f"{name} severity {severity}")


def test_spatter_building_blocks_match_opencv():
    """Canny, the capped chamfer distance and equalizeHist against OpenCV on spatter-like liquid layers."""
    import cv2
    from skimage.filters import gaussian

    from robustfm.corruptions.spatter import canny, chamfer_distance, equalize_hist

    for seed, sigma, threshold in ((0, 4, 0.69), (1, 3, 0.68), (2, 2, 0.68)):
        rng = np.random.RandomState(seed)
        liquid = gaussian(rng.normal(size=(64, 80), loc=0.65, scale=0.3), sigma=sigma)
        liquid[liquid < threshold] = 0
        u8 = (liquid * 255).astype(np.uint8)
        edges = cv2.Canny(u8, 50, 150) > 0
        ours = canny(torch.from_numpy(u8).float()[None, None])[0, 0].numpy()
        np.testing.assert_array_equal(ours, edges)
        expected = np.minimum(cv2.distanceTransform(np.where(edges, 0, 255).astype(np.uint8), cv2.DIST_L2, 5), 20)
        distance = chamfer_distance(torch.from_numpy(edges)[None, None], 20.0)[0, 0].numpy()
        np.testing.assert_allclose(distance, expected, atol=1e-5)
        levels = np.floor(expected).astype(np.uint8)
        equalized = equalize_hist(torch.from_numpy(levels).float()[None, None])[0, 0].numpy()
        np.testing.assert_array_equal(equalized, cv2.equalizeHist(levels))
