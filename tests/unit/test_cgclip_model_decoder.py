"""Corruption decoder: tap blocks, output shape at input resolution, parameter budget on ViT-B/32, gradients."""

from __future__ import annotations

import pytest
import torch

from robustfm.methods.cgclip import CGClipModel
from robustfm.models.corruption_decoder import CorruptionDecoder, decoder_tap_blocks

TINY_CHANNELS = (32, 16, 8)


@pytest.fixture(scope="module")
def vit_b32():
    from robustfm.models import create_model

    return create_model("open_clip/ViT-B-32")


def tiny_cgclip(channels=TINY_CHANNELS) -> CGClipModel:
    from robustfm.models import create_model

    torch.manual_seed(0)
    return CGClipModel(create_model("open_clip/tiny-vit"), decoder_channels=channels)


@pytest.mark.parametrize(
    ("num_blocks", "expected"),
    [(12, (4, 8, 12)), (24, (8, 16, 24)), (4, (1, 2, 4)), (3, (1, 2, 3)), (32, (10, 21, 32))],
)
def test_tap_blocks_are_proportional(num_blocks, expected):
    assert decoder_tap_blocks(num_blocks) == expected


def test_tap_blocks_need_enough_depth():
    with pytest.raises(ValueError, match="at least 3 blocks"):
        decoder_tap_blocks(2)


def test_tiny_model_map_has_input_resolution():
    model = tiny_cgclip()
    assert model.tap_blocks == (1, 2, 4)
    pixels = torch.rand(2, 3, 64, 64)
    embeddings, logits = model.encode_image_and_map(pixels)
    assert logits.shape == (2, 1, 64, 64) and logits.dtype == torch.float32
    assert embeddings.shape == (2, model.clip.embed_dim)
    # The embedding is the backbone's own: the decoder does not alter the image tower's output.
    torch.testing.assert_close(embeddings, model.encode_image(pixels))
    with torch.no_grad():
        probabilities = model.predict_map(pixels)
    assert float(probabilities.min()) >= 0.0 and float(probabilities.max()) <= 1.0


def test_decoder_output_depends_on_every_tap():
    decoder = CorruptionDecoder(width=16, grid_size=(4, 4), channels=TINY_CHANNELS)
    taps = [torch.randn(1, 16, 16, requires_grad=True) for _ in range(3)]
    decoder(taps, output_size=(40, 40)).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in taps)


def test_decoder_rejects_tokens_of_the_wrong_layout():
    decoder = CorruptionDecoder(width=16, grid_size=(4, 4), channels=TINY_CHANNELS)
    with_class_token = [torch.randn(1, 17, 16) for _ in range(3)]
    with pytest.raises(ValueError, match="without the class token"):
        decoder(with_class_token, output_size=(32, 32))
    with pytest.raises(ValueError, match="3 tapped blocks"):
        decoder([torch.randn(1, 16, 16)] * 2, output_size=(32, 32))


def test_model_rejects_bad_tap_blocks():
    from robustfm.models import create_model

    clip = create_model("open_clip/tiny-vit")
    with pytest.raises(ValueError, match=r"1\.\.4"):
        CGClipModel(clip, decoder_channels=TINY_CHANNELS, tap_blocks=(1, 2, 5))
    with pytest.raises(ValueError, match="one block per decoder stage"):
        CGClipModel(clip, decoder_channels=TINY_CHANNELS, tap_blocks=(2, 4))


def test_vit_b32_decoder_matches_the_papers_parameter_budget(vit_b32):
    model = CGClipModel(vit_b32)
    assert model.tap_blocks == (4, 8, 12)
    clip_parameters = sum(p.numel() for p in vit_b32.parameters())
    decoder_parameters = sum(p.numel() for p in model.decoder.parameters())
    assert 150e6 < clip_parameters < 152.5e6  # ViT-B/32 CLIP, both towers
    # Paper 000, conclusion: "a temporary 5.96% increase in trainable parameters".
    increase = 100 * decoder_parameters / clip_parameters
    assert increase == pytest.approx(5.96, abs=0.05), f"decoder adds {increase:.3f}% ({decoder_parameters} parameters)"


def test_vit_b32_map_has_input_resolution(vit_b32):
    model = CGClipModel(vit_b32)
    with torch.no_grad():
        _, logits = model.encode_image_and_map(torch.rand(1, 3, 224, 224))
    assert logits.shape == (1, 1, 224, 224)
    assert torch.isfinite(logits).all()
