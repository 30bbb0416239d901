"""Ground-truth mappers with random (seeded) weights: contract, eq. 1 against an independent computation, loading."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torch.nn.functional as F

from robustfm.config.core import ConfigError
from robustfm.gtmaps import GT_MAPS, build_gt_mapper
from robustfm.gtmaps.config import GTMapConfig
from robustfm.gtmaps.vgg import WeightsUnavailableError
from robustfm.registry import UnknownNameError


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(3, 3, 40, 56, generator=generator)
    corrupted = (clean + 0.2 * torch.randn(clean.shape, generator=generator)).clamp(0, 1)
    return clean, corrupted


@pytest.fixture(scope="module")
def vgg():
    return build_gt_mapper("vgg16_l1", weights=None, scale=1.0)


def _mapper(name):
    return build_gt_mapper(name, scale=1.0) if name == "pixel_l1" else build_gt_mapper(name, weights=None, scale=1.0)


def test_registry_names():
    assert GT_MAPS.names() == ["pixel_l1", "vgg16_l1"]
    for name in GT_MAPS.names():
        assert GT_MAPS.meta(name)["default_scale"] > 0


@pytest.mark.parametrize("name", ["vgg16_l1", "pixel_l1"])
def test_map_shape_dtype_range_and_zero_for_clean(name, pair):
    clean, corrupted = pair
    mapper = _mapper(name)
    maps = mapper(clean, corrupted)
    assert maps.shape == (3, 1, 40, 56) and maps.dtype == torch.float32
    assert maps.min() >= 0 and maps.max() <= 1 and maps.mean() > 0
    assert torch.equal(mapper(clean, clean), torch.zeros(3, 1, 40, 56))
    # One clean pair inside a batch of corrupted ones still gets an exactly zero map.
    mixed = torch.cat([corrupted[:2], clean[2:]])
    maps = mapper(clean, mixed)
    assert torch.count_nonzero(maps[2]) == 0 and maps[:2].mean() > 0


@pytest.mark.parametrize("name", ["vgg16_l1", "pixel_l1"])
def test_mapper_is_frozen(name, pair):
    clean, corrupted = pair
    mapper = _mapper(name)
    mapper.train()
    assert not mapper.training
    assert all(not p.requires_grad for p in mapper.parameters())
    maps = mapper(clean.clone().requires_grad_(True), corrupted)
    assert not maps.requires_grad


@pytest.mark.parametrize("name", ["vgg16_l1", "pixel_l1"])
def test_fixed_scale_normalisation(name, pair):
    clean, corrupted = pair
    raw = _mapper(name).raw(clean, corrupted)
    scale = float(raw.quantile(0.5))
    maps = build_gt_mapper(name, scale=scale) if name == "pixel_l1" else build_gt_mapper(name, scale=scale)
    assert torch.allclose(maps(clean, corrupted), (raw / scale).clamp(0, 1), atol=1e-6)
    # A small difference stays a weak map: no per-image stretching to full strength.
    slightly = (clean + 1e-3).clamp(0, 1)
    assert maps(clean, slightly).max() < 0.5


def test_pixel_map_is_the_channel_mean_of_absolute_differences(pair):
    clean, corrupted = pair
    expected = (clean - corrupted).abs().mean(1, keepdim=True)
    assert torch.allclose(build_gt_mapper("pixel_l1", scale=1.0)(clean, corrupted), expected)
    stronger = (clean + 0.4 * (corrupted - clean) / 0.2).clamp(0, 1)
    mapper = build_gt_mapper("pixel_l1")
    assert mapper(clean, stronger).mean() > mapper(clean, corrupted).mean()


def test_vgg_map_matches_eq1_computed_with_torchvision_feature_extraction(vgg, pair):
    """Independent path: torchvision's feature extractor at relu1_2 .. relu5_3 on ImageNet-normalised inputs."""
    from torchvision.models.feature_extraction import create_feature_extractor

    clean, corrupted = pair
    nodes = {
        "features.3": "relu1_2",
        "features.8": "relu2_2",
        "features.15": "relu3_3",
        "features.22": "relu4_3",
        "features.29": "relu5_3",
    }

    class Wrapped(torch.nn.Module):
        def __init__(self, features):
            super().__init__()
            self.features = features

        def forward(self, x):
            return self.features(x)

    extractor = create_feature_extractor(Wrapped(vgg.features), return_nodes=nodes)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        a = extractor((clean - mean) / std)
        b = extractor((corrupted - mean) / std)
    per_layer = [
        F.interpolate((a[k] - b[k]).abs().sum(1, keepdim=True), size=(40, 56), mode="bilinear") for k in nodes.values()
    ]
    expected = torch.stack(per_layer).mean(0)
    assert torch.allclose(vgg.raw(clean, corrupted), expected, rtol=1e-4, atol=1e-6)
    assert a["relu3_3"].shape[-2:] == (10, 14)  # taps before pooling: 40x56 / 4


def test_eq1_on_two_layers_matches_a_hand_computation(pair):
    """Eq. 1 by hand with plain convolutions: per layer the L1 distance is a SUM over channels (a channel mean would
    weigh relu2_2's 128 channels twice as little as relu1_2's 64), upsampled, then the layers are averaged."""
    clean, corrupted = pair
    mapper = build_gt_mapper("vgg16_l1", weights=None, layers=(1, 2), scale=1.0)
    convs = [m for m in mapper.features if isinstance(m, torch.nn.Conv2d)]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def relu_taps(images):
        x = (images - mean) / std
        x = F.relu(convs[1](F.relu(convs[0](x))))  # relu1_2
        first = x
        x = F.max_pool2d(x, 2)
        x = F.relu(convs[3](F.relu(convs[2](x))))  # relu2_2
        return first, x

    with torch.no_grad():
        (a1, a2), (b1, b2) = relu_taps(clean), relu_taps(corrupted)
        size = tuple(clean.shape[-2:])
        layer1 = F.interpolate((a1 - b1).abs().sum(1, keepdim=True), size=size, mode="bilinear")
        layer2 = F.interpolate((a2 - b2).abs().sum(1, keepdim=True), size=size, mode="bilinear")
    assert torch.allclose(mapper.raw(clean, corrupted), (layer1 + layer2) / 2, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(mapper.raw(clean, corrupted), (layer1 / 64 + layer2 / 128) / 2, rtol=1e-2)


def test_vgg_layer_selection_truncates_the_network(pair):
    clean, corrupted = pair
    shallow = build_gt_mapper("vgg16_l1", weights=None, layers=(1, 2), scale=1.0)
    assert len(shallow.features) == 9
    full = build_gt_mapper("vgg16_l1", weights=None, layers=(2, 1), scale=1.0)
    assert full.layers == (1, 2)
    assert torch.allclose(shallow.raw(clean, corrupted), full.raw(clean, corrupted))
    only_first = build_gt_mapper("vgg16_l1", weights=None, layers=(1,), scale=1.0)
    assert not torch.allclose(only_first.raw(clean, corrupted), shallow.raw(clean, corrupted))
    for bad in [(), (0,), (6,), (1, 1)]:
        with pytest.raises(ValueError, match="conv blocks among 1..5"):
            build_gt_mapper("vgg16_l1", weights=None, layers=bad, scale=1.0)


def test_non_default_layers_without_scale_warn():
    with pytest.warns(UserWarning, match="fitted for layers 1..5"):
        build_gt_mapper("vgg16_l1", weights=None, layers=(1, 2))


def test_random_init_is_seeded(vgg, pair):
    clean, corrupted = pair
    again = build_gt_mapper("vgg16_l1", weights=None, scale=1.0)
    assert torch.equal(vgg.raw(clean, corrupted), again.raw(clean, corrupted))


@pytest.mark.parametrize("layout", ["full_pth", "features_safetensors"])
def test_vgg_loads_local_weights(tmp_path, pair, layout):
    from safetensors.torch import save_file
    from torchvision.models.vgg import cfgs, make_layers

    clean, corrupted = pair
    torch.manual_seed(123)  # different from the mapper's own random init
    features = make_layers(cfgs["D"])  # torchvision's own vgg16().features, without the large classifier
    for module in features:
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.bias, std=0.1)
    if layout == "full_pth":  # torchvision's vgg16().state_dict() layout: features.N.* plus classifier.*
        path = tmp_path / "vgg16.pth"
        state = {f"features.{k}": v for k, v in features.state_dict().items()}
        torch.save({**state, "classifier.6.weight": torch.zeros(10, 4)}, path)
    else:
        path = tmp_path / "vgg16_features.safetensors"
        save_file({k: v.contiguous() for k, v in features.state_dict().items()}, str(path))
    mapper = build_gt_mapper("vgg16_l1", weights=str(path), scale=1.0)
    assert torch.equal(mapper.features[0].weight, features[0].weight)
    assert torch.equal(mapper.features[28].bias, features[28].bias)
    random_init = build_gt_mapper("vgg16_l1", weights=None, scale=1.0)
    assert not torch.allclose(mapper.raw(clean, corrupted), random_init.raw(clean, corrupted))


def test_bad_weights_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a torchvision weights name"):
        build_gt_mapper("vgg16_l1", weights=str(tmp_path / "missing.pth"))
    partial = tmp_path / "partial.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3), "features.0.bias": torch.zeros(64)}, partial)
    with pytest.raises(ValueError, match=r"lack \['2.bias', '2.weight', '5.bias'"):
        build_gt_mapper("vgg16_l1", weights=str(partial))
    wrong = tmp_path / "wrong.pth"
    torch.save(
        {
            "features.0.weight": torch.zeros(8, 3, 3, 3),
            "features.0.bias": torch.zeros(8),
            "features.2.weight": torch.zeros(64, 64, 3, 3),
            "features.2.bias": torch.zeros(64),
        },
        wrong,
    )
    with pytest.raises(ValueError, match="do not fit torchvision's vgg16"):
        build_gt_mapper("vgg16_l1", weights=str(wrong), layers=(1,), scale=1.0)


def test_offline_torchvision_name_says_how_to_pass_a_local_file(monkeypatch):
    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", unreachable)
    with pytest.raises(WeightsUnavailableError, match="pass its local path") as info:
        build_gt_mapper("vgg16_l1", weights="IMAGENET1K_V1")
    assert "vgg16-397923af.pth" in str(info.value)


def test_bad_calls_are_explained(pair):
    clean, corrupted = pair
    with pytest.raises(UnknownNameError, match="did you mean 'pixel_l1'"):
        build_gt_mapper("pixel_l2")
    with pytest.raises(ValueError, match="no weights or layers"):
        build_gt_mapper("pixel_l1", weights="IMAGENET1K_V1")
    with pytest.raises(ValueError, match="differ in shape"):
        build_gt_mapper("pixel_l1")(clean, corrupted[:2])
    with pytest.raises(ValueError, match="scale must be a positive"):
        build_gt_mapper("pixel_l1", scale=0.0)


def test_config_checks_name_the_field():
    assert GTMapConfig().layers == (1, 2, 3, 4, 5)
    with pytest.raises(ConfigError, match="^name"):
        GTMapConfig(name="vgg19")
    with pytest.raises(ConfigError, match="^weights"):
        GTMapConfig(name="pixel_l1", layers=None)
    with pytest.raises(ConfigError, match="^layers"):
        GTMapConfig(layers=(0, 1))
    with pytest.raises(ConfigError, match="^max_actors"):
        GTMapConfig(min_actors=2, max_actors=1)
    GTMapConfig(name="pixel_l1", weights=None, layers=None, scale=0.2)
