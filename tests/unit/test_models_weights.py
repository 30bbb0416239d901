"""Weights: local checkpoints round-trip through create_model, exports load in the plain libraries, wrong files and
offline tags fail with messages that say what to do."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from robustfm.models import (
    TINY_MODELS,
    CheckpointMismatchError,
    ClipModel,
    PretrainedUnavailableError,
    create_model,
    load_weights,
    open_clip_state_dict,
    save_weights,
    timm_state_dict,
)


@pytest.fixture(scope="module")
def pixels():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def outputs(model, pixels):
    """Everything a model computes that its weights decide."""
    with torch.no_grad():
        embedding, tokens = model.eval().encode_image_with_tokens(pixels, (1, 4))
        result = [embedding, tokens[1], tokens[4]]
        if isinstance(model, ClipModel):
            result += [model.encode_text(["a photo", "fog"]), model.logit_scale.detach().clone()]
        else:
            result.append(model(pixels))
    return result


def library_state_dict(model):
    return open_clip_state_dict(model) if isinstance(model, ClipModel) else timm_state_dict(model)


def assert_same(first, second):
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("layout", ["wrapper", "library"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_checkpoint_round_trips(tmp_path, pixels, name, layout, suffix):
    source = create_model(name)
    if isinstance(source, ClipModel):
        with torch.no_grad():
            source.logit_scale.fill_(2.5)  # away from the init value, so the [1] <-> 0-dim reshaping is exercised
    path = tmp_path / f"weights{suffix}"
    state = source.state_dict() if layout == "wrapper" else library_state_dict(source)
    if suffix == ".safetensors":
        if layout == "wrapper":
            save_weights(source, path)
        else:
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)

    loaded = create_model(name, pretrained=str(path))  # its random init differs: equal outputs mean it loaded
    assert_same(outputs(source, pixels), outputs(loaded, pixels))
    assert loaded.pretrained == str(path)
    if isinstance(loaded, ClipModel):
        assert loaded.logit_scale.shape == (1,)


def test_open_clip_export_loads_in_open_clip(tmp_path, pixels):
    import open_clip

    model = create_model("open_clip/tiny-vit").eval()
    state = open_clip_state_dict(model)
    assert state["logit_scale"].shape == ()  # open_clip's own 0-dim layout
    assert model.logit_scale.shape == (1,)  # while the wrapper trains with shape [1]
    path = tmp_path / "tiny-vit.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    plain = open_clip.create_model("tiny-vit", pretrained=str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_image(model.pixels(pixels)), model.encode_image(pixels))
        torch.testing.assert_close(plain.logit_scale.reshape(1), model.logit_scale)


def test_timm_export_loads_in_timm(tmp_path, pixels):
    import timm

    model = create_model("timm/tiny-vit").eval()
    path = tmp_path / "tiny-vit.safetensors"
    save_file(timm_state_dict(model), str(path))
    plain = timm.create_model("robustfm_tiny_vit", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(model.pixels(pixels)), model(pixels))


def test_checkpoint_of_another_model_is_rejected_clearly(tmp_path):
    path = tmp_path / "timm_tiny.safetensors"
    save_weights(create_model("timm/tiny-vit"), path)
    with pytest.raises(CheckpointMismatchError) as raised:
        create_model("open_clip/tiny-vit", pretrained=str(path))
    message = str(raised.value)
    assert str(path) in message
    n_expected = len(open_clip_state_dict(create_model("open_clip/tiny-vit")))
    assert f"missing keys {n_expected} [ln_final.bias, ln_final.weight, logit_scale, " in message
    assert "unexpected keys" in message and "[model.blocks.0.attn.proj.bias, " in message


def test_shape_mismatch_names_the_key(tmp_path):
    state = open_clip_state_dict(create_model("open_clip/tiny-vit"))
    state["visual.proj"] = torch.zeros(64, 16)
    path = tmp_path / "narrow_proj.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatches 1 \[visual\.proj \(file \(64, 16\), model"):
        create_model("open_clip/tiny-vit", pretrained=str(path))


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nowhere" / "weights.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        create_model("timm/tiny-vit", pretrained=str(path))


def test_torch_checkpoint_needs_plain_tensors(tmp_path):
    not_a_state_dict = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_a_state_dict)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        create_model("timm/tiny-vit", pretrained=str(not_a_state_dict))
    pickled_module = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), pickled_module)  # a full pickle: refused by weights_only=True
    with pytest.raises(ValueError, match="weights_only=True"):
        create_model("timm/tiny-vit", pretrained=str(pickled_module))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("name", "tag"), [("open_clip/ViT-B-32", "openai"), ("timm/vit_tiny_patch16_224", "augreg_in21k")]
)
def test_pretrained_tag_offline_fails_fast_with_a_hint(name, tag):
    started = time.monotonic()
    with pytest.raises(PretrainedUnavailableError) as raised:
        create_model(name, pretrained=tag)
    elapsed = time.monotonic() - started
    message = str(raised.value)
    assert name in message and repr(tag) in message
    assert "model.pretrained=/path/to/weights.safetensors" in message
    assert elapsed < 20, f"offline failure took {elapsed:.1f} s"


@pytest.mark.parametrize(
    ("name", "tag", "expected"),
    [
        ("open_clip/ViT-B-32", "opanai", "did you mean 'openai'"),
        ("open_clip/tiny-vit", "openai", "Tags of open_clip/tiny-vit: none"),
        ("timm/tiny-vit", "in1k", "Tags of timm/tiny-vit: none"),
    ],
)
def test_unknown_tag_lists_tags_and_the_path_hint(name, tag, expected):
    with pytest.raises(ValueError) as raised:
        create_model(name, pretrained=tag)
    assert expected in str(raised.value)
    assert "model.pretrained=/path/to/weights.safetensors" in str(raised.value)


class TiedPair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.decoder = nn.Linear(4, 4)
        self.decoder.weight = self.encoder.weight  # tied, as embeddings and output heads often are


def test_save_and_load_weights_with_shared_tensors(tmp_path):
    source = TiedPair()
    path = save_weights(source, tmp_path / "sub" / "tied.safetensors", metadata={"model": "tied"})
    with safe_open(str(path), framework="pt") as stored:
        assert sorted(stored.keys()) == ["decoder.bias", "encoder.bias", "encoder.weight"]  # one copy of the tie
        assert stored.metadata() == {"model": "tied"}
    target = load_weights(TiedPair(), path)
    assert torch.equal(target.decoder.weight, source.encoder.weight)
    assert target.decoder.weight is target.encoder.weight
    with pytest.raises(CheckpointMismatchError, match="tied.safetensors"):
        load_weights(nn.Linear(4, 4), path)
