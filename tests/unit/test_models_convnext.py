"""Non-ViT open_clip towers (paper 003's ConvNeXt-B path, on the tiny registered ConvNeXt): they embed, export and
load like ViTs; token access fails naming the architecture; an image-size override runs the same weights at another
resolution, and is refused for a ViT."""

from __future__ import annotations

import pytest
import torch

from robustfm.models import TINY_CONV_MODELS, ClipModel, TokensUnavailableError, create_model
from robustfm.models.export import export_image_tower

NAME = "open_clip/tiny-convnext"


@pytest.fixture(scope="module")
def model() -> ClipModel:
    torch.manual_seed(0)
    return create_model(NAME).eval()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_the_tiny_convnext_is_registered_and_embeds(model, pixels):
    assert TINY_CONV_MODELS == (NAME,)
    assert isinstance(model, ClipModel) and not model.has_tokens
    assert model.image_tower == "TimmModel(test_convnext)" and model.image_size == 64 and model.embed_dim == 32
    with torch.no_grad():
        embedding = model.encode_image(pixels)
        unit = model.encode_image(pixels, normalize=True)
        text = model.encode_text(["a photo of a cat", "fog"], normalize=True)
    assert embedding.shape == (3, 32) and text.shape == (2, 32)
    torch.testing.assert_close(unit, torch.nn.functional.normalize(embedding, dim=-1))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels[1:2]), embedding[1:2], atol=1e-5, rtol=1e-4)


def test_gradients_reach_the_image_tower_and_the_input(pixels):
    model = create_model(NAME).train()
    x = pixels.clone().requires_grad_(True)
    model.encode_image(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.image_parameters())


@pytest.mark.parametrize("access", ["encode_image_with_tokens", "grid_size", "num_blocks", "attention_adapter"])
def test_token_access_names_the_architecture(model, pixels, access):
    with pytest.raises(TokensUnavailableError, match=r"open_clip/tiny-convnext has a TimmModel\(test_convnext\)"):
        if access == "encode_image_with_tokens":
            model.encode_image_with_tokens(pixels, (1,))
        elif access == "attention_adapter":
            model.attention_adapter()
        else:
            getattr(model, access)
    assert "image_tower='TimmModel(test_convnext)'" in repr(model)  # the repr itself does not raise


def test_an_image_size_override_runs_the_same_weights_at_another_size(model, tmp_path):
    resized = create_model(f"{NAME}:48", pretrained=None)
    assert resized.image_size == 48 and resized.arch == "tiny-convnext"
    resized.load_state_dict(model.state_dict())  # no parameter depends on the input size
    small = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(resized.encode_image(small), model.clip.encode_image(resized.pixels(small)))
    with pytest.raises(ValueError, match=r"\(N, 3, 48, 48\)"):
        resized.encode_image(torch.rand(1, 3, 64, 64))
    path = export_image_tower(model, tmp_path / "model.safetensors", metadata={"model_name": f"{NAME}:48"})
    loaded = create_model(f"{NAME}:48", pretrained=str(path))  # exported 64-px weights load at 48 px
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(small), resized.encode_image(small))


def test_an_image_size_override_is_refused_where_weights_depend_on_the_size():
    with pytest.raises(ValueError, match=r"open_clip/tiny-vit:48: its VisionTransformer .* sized for 64 px"):
        create_model("open_clip/tiny-vit:48")
    assert create_model("open_clip/tiny-vit:64").image_size == 64  # the native size is no override
    with pytest.raises(ValueError, match=r"must be an integer >= 16"):
        create_model(f"{NAME}:big")


def test_the_export_loads_strictly_in_open_clip(model, tmp_path, pixels):
    import open_clip
    from safetensors.torch import load_file

    path = export_image_tower(model, tmp_path / "model.safetensors")
    plain = open_clip.create_model("tiny-convnext")
    plain.load_state_dict(load_file(path))  # strict
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_image(model.pixels(pixels)), model.encode_image(pixels))
