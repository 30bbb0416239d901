"""The fast building blocks of the corruptions against their libraries, at sizes the parity tests do not reach.

The parity tests run 64x80 photos, where the banded Gaussian product is a single dense block and spatter's chamfer
distance never meets a big empty area; these tests use 224 px and odd sizes, and the libraries themselves (scipy,
OpenCV, Pillow) as the reference.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from _corruption_reference import reference_output, to_tensor
from scipy import ndimage

from robustfm.corruptions import corrupt
from robustfm.corruptions.blur import DEFOCUS_BLUR_PARAMS, defocus_kernel
from robustfm.corruptions.ops import correlate2d, correlate_separable, gaussian_kernel1d, pad2d
from robustfm.corruptions.spatter import SPATTER_PARAMS, canny, chamfer_distance, water_shading

SCIPY_MODE = {"nearest": "nearest", "reflect": "reflect", "mirror": "mirror"}


@pytest.mark.parametrize("mode", ["nearest", "reflect", "mirror"])
@pytest.mark.parametrize(("shape", "sigma"), [((224, 200), 1.0), ((224, 200), 3.0), ((97, 131), 2.0), ((300, 65), 4.0)])
def test_gaussian_band_blocks_match_scipy(mode: str, shape: tuple[int, int], sigma: float):
    rng = np.random.default_rng(0)
    images = rng.random((2, 1, *shape))
    kernel = gaussian_kernel1d(sigma, 4.0)
    expected = ndimage.gaussian_filter(images, sigma=(0, 0, sigma, sigma), mode=SCIPY_MODE[mode], truncate=4.0)
    ours = correlate_separable(torch.from_numpy(images), kernel, kernel, mode).numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)
    ours32 = correlate_separable(torch.from_numpy(images).float(), kernel, kernel, mode).double().numpy()
    np.testing.assert_allclose(ours32, expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("severity", [1, 5])
@pytest.mark.parametrize("shape", [(224, 200), (61, 97)])
def test_defocus_fft_correlation_matches_scipy(severity: int, shape: tuple[int, int]):
    """The FFT path pads to a fast transform length (e.g. 244 -> 250); the valid part must stay exact."""
    rng = np.random.default_rng(1)
    images = rng.random((2, 3, *shape))
    kernel = defocus_kernel(*DEFOCUS_BLUR_PARAMS[severity - 1])
    expected = ndimage.correlate(images, kernel[None, None], mode="mirror")  # OpenCV's BORDER_REFLECT_101
    ours = correlate2d(torch.from_numpy(images), torch.from_numpy(kernel), mode="mirror").numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)
    ours32 = correlate2d(torch.from_numpy(images).float(), torch.from_numpy(kernel), mode="mirror").double().numpy()
    np.testing.assert_allclose(ours32, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["nearest", "reflect", "mirror"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int16, torch.bool])
def test_pad2d_matches_numpy_pad_for_every_width(mode: str, dtype: torch.dtype):
    numpy_mode = {"nearest": "edge", "reflect": "symmetric", "mirror": "reflect"}[mode]
    base = np.arange(2 * 5 * 7).reshape(2, 5, 7) % (2 if dtype == torch.bool else 11)
    images = torch.from_numpy(base).to(dtype)
    for pad_y, pad_x in [((1, 1), (1, 1)), ((0, 4), (6, 2)), ((9, 6), (12, 3))]:  # narrow, mixed, wider than the image
        expected = np.pad(base, ((0, 0), pad_y, pad_x), mode=numpy_mode)
        ours = pad2d(images, pad_y, pad_x, mode)
        assert ours.dtype == dtype
        np.testing.assert_array_equal(
            ours.to(torch.int64).numpy(), expected.astype(np.int64), err_msg=str((pad_y, pad_x))
        )


def _liquid_u8(seed: int, shape: tuple[int, int], severity: int) -> np.ndarray:
    """The reference's uint8 liquid layer of a water spatter (severity 1-3) for one random field."""
    from skimage.filters import gaussian

    mean, std, sigma, threshold = SPATTER_PARAMS[severity - 1][:4]
    liquid = gaussian(np.random.RandomState(seed).normal(size=shape, loc=mean, scale=std), sigma=sigma)
    liquid[liquid < threshold] = 0
    return (liquid * 255).astype(np.uint8)


def _opencv_shading(liquid_u8: np.ndarray) -> np.ndarray:
    """The reference's OpenCV chain from the uint8 liquid layer to the drop shading (its spatter, verbatim)."""
    import cv2

    dist = 255 - cv2.Canny(liquid_u8, 50, 150)
    dist = cv2.distanceTransform(dist, cv2.DIST_L2, 5)
    _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
    dist = cv2.blur(dist, (3, 3)).astype(np.uint8)
    dist = cv2.equalizeHist(dist)
    dist = cv2.filter2D(dist, cv2.CV_8U, np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]]))
    return cv2.blur(dist, (3, 3)).astype(np.float32)


@pytest.mark.parametrize(("shape", "severity"), [((224, 224), 1), ((224, 224), 3), ((97, 131), 2), ((300, 180), 1)])
def test_spatter_shading_matches_opencv_exactly(shape: tuple[int, int], severity: int):
    """Canny, the exact integer chamfer distance and the uint8 steps reproduce OpenCV pixel for pixel."""
    import cv2

    layers = [_liquid_u8(seed, shape, severity) for seed in range(3)]
    batch = torch.from_numpy(np.stack(layers)).unsqueeze(1).to(torch.int32)
    edges = canny(batch)
    distance = chamfer_distance(edges, 20.0)
    shading = water_shading(batch)
    for i, layer in enumerate(layers):
        expected_edges = cv2.Canny(layer, 50, 150) > 0
        np.testing.assert_array_equal(edges[i, 0].numpy(), expected_edges)
        expected_distance = np.minimum(
            cv2.distanceTransform(np.where(expected_edges, 0, 255).astype(np.uint8), 2, 5), 20
        )
        assert expected_distance.max() > 12, "the field should leave areas far from any edge"
        np.testing.assert_allclose(distance[i, 0].numpy(), expected_distance, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(shading[i, 0].numpy(), _opencv_shading(layer))


def test_canny_direction_rule_on_every_gradient_angle():
    """Rings of every radius and angle cross OpenCV's 22.5 / 67.5 degree direction bounds at many gradients."""
    import cv2

    yy, xx = np.mgrid[0:160, 0:160].astype(np.float64)
    rings = []
    for cy, cx, period in [(80.0, 80.0, 9.0), (10.5, 150.3, 13.0), (150.2, 3.7, 7.0)]:
        radius = np.hypot(yy - cy, xx - cx)
        rings.append((127.5 + 127.5 * np.sin(radius / period * 2 * np.pi)).astype(np.uint8))
    ours = canny(torch.from_numpy(np.stack(rings)).unsqueeze(1))
    for i, ring in enumerate(rings):
        np.testing.assert_array_equal(ours[i, 0].numpy(), cv2.Canny(ring, 50, 150) > 0)


def _photo(height: int, width: int) -> np.ndarray:
    from sklearn.datasets import load_sample_images

    pixels = load_sample_images().images[1]  # flower.jpg: not one of the parity photos
    return np.ascontiguousarray(pixels[:height, :width])


@pytest.mark.parametrize("severity", [1, 3, 5])
@pytest.mark.parametrize("shape", [(101, 157), (224, 224), (225, 90)])
def test_pixelate_and_jpeg_match_the_reference_at_other_sizes(severity: int, shape: tuple[int, int]):
    image = _photo(*shape)
    pixelated = corrupt(to_tensor([image]), "pixelate", severity)[0].double().numpy()
    diff = np.abs(pixelated - reference_output("pixelate", image, severity))
    assert diff.max() <= 1 / 255 + 1e-6 and diff.mean() < 0.6 / 255  # the reference rounds its BOX means to uint8
    compressed = corrupt(to_tensor([image]), "jpeg_compression", severity)[0].double().numpy()
    np.testing.assert_allclose(compressed, reference_output("jpeg_compression", image, severity), rtol=0, atol=1e-6)


def test_jpeg_compression_does_not_import_torchvision():
    """The codec is Pillow's: the first call in a worker must not pull in torchvision (and torch._dynamo with it)."""
    script = textwrap.dedent(
        """
        import sys
        import torch
        from robustfm.corruptions import corrupt
        out = corrupt(torch.rand(2, 3, 40, 56), "jpeg_compression", 3)
        assert out.shape == (2, 3, 40, 56)
        print(sorted(name for name in ("torchvision", "torch._dynamo") if name in sys.modules))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr
