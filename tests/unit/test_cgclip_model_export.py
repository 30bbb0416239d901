"""Export without the decoder, loading back with open_clip, and WiSE-FT interpolation."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from robustfm.methods.cgclip import CGClipModel, CGClipTask
from robustfm.methods.cgclip_config import CGClipConfig
from robustfm.models.export import (
    clip_state_dict,
    export_image_tower,
    export_wise_ft,
    image_tower_state,
    interpolate_weights,
)

CHANNELS = (32, 16, 8)


def trained_tiny_model() -> tuple[CGClipModel, dict[str, torch.Tensor]]:
    """A tiny CG-CLIP after one Tune step, and its open_clip state before the step."""
    from robustfm.models import create_model

    torch.manual_seed(0)
    model = CGClipModel(create_model("open_clip/tiny-vit"), decoder_channels=CHANNELS)
    before = clip_state_dict(model.clip)
    task = CGClipTask(model, CGClipConfig(decoder_channels=CHANNELS))
    optimizer = torch.optim.SGD(task.parameters(), lr=0.5)
    clean = torch.rand(2, 3, 64, 64)
    losses = task({"image": clean, "corrupted": 1 - clean, "map": torch.rand(2, 1, 64, 64)})
    (losses["contrastive"] + losses["corruption"]).backward()
    optimizer.step()
    return model, before


@pytest.fixture(scope="module")
def trained():
    return trained_tiny_model()


def test_export_drops_the_decoder_and_loads_back_with_open_clip(trained, tmp_path):
    import open_clip

    model, _ = trained
    path = export_image_tower(model.clip, tmp_path / "clip.safetensors")
    state = load_file(str(path))
    assert not any("decoder" in key for key in state)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["arch"] == "tiny-vit"

    # open_clip's own model, strict load: the file is in open_clip's layout (tiny-vit is registered with open_clip
    # by robustfm.models when the model above was built).
    fresh = open_clip.create_model("tiny-vit")
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    model.eval()
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        normalized = model.clip.pixels(pixels)
        torch.testing.assert_close(fresh.encode_image(normalized), model.encode_image(pixels))


def test_export_loads_through_the_factory(trained, tmp_path):
    from robustfm.models import create_model

    model, _ = trained
    path = export_image_tower(model.clip, tmp_path / "clip.safetensors")
    reloaded = create_model("open_clip/tiny-vit", pretrained=str(path)).eval()
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_image(pixels), model.eval().encode_image(pixels))
        torch.testing.assert_close(reloaded.encode_text(["a photo"]), model.clip.encode_text(["a photo"]))


def test_export_of_the_image_tower_alone(trained, tmp_path):
    import open_clip

    model, _ = trained
    state = load_file(str(export_image_tower(model.clip, tmp_path / "visual.safetensors", include_text_tower=False)))
    assert state and all(key.startswith("visual.") for key in state)
    result = open_clip.create_model("tiny-vit").load_state_dict(state, strict=False)
    assert not result.unexpected_keys and all(not key.startswith("visual.") for key in result.missing_keys)


def test_training_changed_what_is_exported(trained):
    model, before = trained
    after = clip_state_dict(model.clip)
    assert set(after) == set(before)
    assert any(not torch.equal(before[k], after[k]) for k in image_tower_state(after))


def test_interpolate_weights_endpoints_and_midpoint():
    pretrained = {"w": torch.tensor([0.0, 2.0]), "h": torch.tensor([1.0], dtype=torch.float16), "n": torch.tensor([3])}
    finetuned = {"w": torch.tensor([4.0, 6.0]), "h": torch.tensor([3.0], dtype=torch.float16), "n": torch.tensor([3])}
    for key in pretrained:
        assert torch.equal(interpolate_weights(pretrained, finetuned, 0.0)[key], pretrained[key])
        assert torch.equal(interpolate_weights(pretrained, finetuned, 1.0)[key], finetuned[key])
    middle = interpolate_weights(pretrained, finetuned, 0.5)
    assert torch.equal(middle["w"], torch.tensor([2.0, 4.0]))
    assert middle["h"].dtype == torch.float16 and middle["h"].item() == 2.0
    assert torch.equal(interpolate_weights(pretrained, finetuned, 0.25)["w"], torch.tensor([1.0, 3.0]))


def test_interpolate_weights_rejects_mismatches():
    with pytest.raises(ValueError, match="different keys"):
        interpolate_weights({"a": torch.zeros(1)}, {"b": torch.zeros(1)}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        interpolate_weights({"a": torch.zeros(2)}, {"a": torch.zeros(3)}, 0.5)
    with pytest.raises(ValueError, match="non-floating"):
        interpolate_weights({"a": torch.tensor([1])}, {"a": torch.tensor([2])}, 0.5)
    with pytest.raises(ValueError, match="finite"):
        interpolate_weights({"a": torch.zeros(1)}, {"a": torch.zeros(1)}, float("nan"))


def test_wise_ft_mixes_only_the_image_tower(trained, tmp_path):
    model, before = trained
    after = clip_state_dict(model.clip)
    files = export_wise_ft(model.clip, before, tmp_path, [0.0, 0.5, 1.0])
    assert list(files) == [0.0, 0.5, 1.0]
    states = {alpha: load_file(str(path)) for alpha, path in files.items()}
    for key in image_tower_state(after):
        torch.testing.assert_close(states[0.0][key], before[key])
        torch.testing.assert_close(states[1.0][key], after[key])
        torch.testing.assert_close(states[0.5][key], (before[key] + after[key]) / 2)
    text_keys = [k for k in after if not k.startswith("visual.")]
    assert text_keys and any(not torch.equal(before[k], after[k]) for k in text_keys)
    for state in states.values():
        assert all(torch.equal(state[k], after[k]) for k in text_keys)  # the text tower stays fine-tuned
    with pytest.raises(ValueError, match="two decimals"):
        export_wise_ft(model.clip, before, tmp_path, [0.5, 0.501])
