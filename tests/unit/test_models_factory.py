"""The model factory: every registered tiny model of every family builds through the same path as ViT-B-32 and gives
the documented shapes, batch-first patch tokens, deterministic outputs, gradients and normalization inside."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from robustfm.models import MODELS, TINY_MODELS, ClipModel, TimmClassifier, create_model
from robustfm.registry import UnknownNameError

BATCH = 3


@pytest.fixture(scope="module", params=TINY_MODELS)
def model(request):
    torch.manual_seed(0)
    return create_model(request.param).eval()


@pytest.fixture(scope="module")
def pixels():
    return torch.rand(BATCH, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def library_model(model):
    """The wrapped open_clip / timm model and the mean/std its library documents for it."""
    if isinstance(model, ClipModel):
        import open_clip

        cfg = open_clip.get_model_preprocess_cfg(model.clip)
        return model.clip, cfg["mean"], cfg["std"]
    return model.model, model.model.pretrained_cfg["mean"], model.model.pretrained_cfg["std"]


def normalize(pixels, mean, std):
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def hooked_patch_tokens(model, pixels, block):
    """Reference tokens from a forward hook on the block itself, laid out batch-first by hand."""
    captured = {}
    if isinstance(model, ClipModel):
        transformer = model.clip.visual.transformer
        module, prefix = transformer.resblocks[block - 1], 1
        seq_first = not transformer.batch_first  # open_clip versions differ: read the layout, don't assume it
    else:
        module, prefix, seq_first = model.model.blocks[block - 1], model.model.num_prefix_tokens, False
    handle = module.register_forward_hook(lambda _m, _i, out: captured.setdefault("x", out))
    try:
        model.encode_image(pixels)
    finally:
        handle.remove()
    tokens = captured["x"].transpose(0, 1) if seq_first else captured["x"]
    return tokens[:, prefix:]


def test_families_and_tiny_models_are_registered():
    assert MODELS.names() == ["lpips", "open_clip", "timm"]
    assert set(TINY_MODELS) == {"open_clip/tiny-vit", "timm/tiny-vit"}
    # The registry's listing (no imports) agrees with what each family's builder actually registers.
    from robustfm.models.clip import TINY_CLIP_ARCHS
    from robustfm.models.timm_classifier import TINY_TIMM_ARCHS

    assert MODELS.meta("open_clip")["tiny"] == TINY_CLIP_ARCHS
    assert MODELS.meta("timm")["tiny"] == tuple(TINY_TIMM_ARCHS)


def test_tiny_model_sizes(model):
    assert (model.image_size, model.grid_size, model.width, model.num_blocks) == (64, (8, 8), 64, 4)


def test_output_shapes(model, pixels):
    with torch.no_grad():
        embedding = model.encode_image(pixels)
        unit = model.encode_image(pixels, normalize=True)
    assert embedding.shape == (BATCH, model.embed_dim) and embedding.dtype == torch.float32
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(BATCH))
    if isinstance(model, ClipModel):
        assert model.embed_dim == 32
        tokens = model.tokenize(["a photo of a cat", "fog", ""])
        assert tokens.shape == (3, 77) and tokens.dtype == torch.long
        with torch.no_grad():
            from_strings = model.encode_text(["a photo of a cat", "fog", ""])
            from_tokens = model.encode_text(tokens)
        assert from_strings.shape == (3, 32)
        torch.testing.assert_close(from_strings, from_tokens)
        assert model.logit_scale.shape == (1,)
        assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-5)
    else:
        assert isinstance(model, TimmClassifier)
        assert model.num_classes == 10
        with torch.no_grad():
            assert model(pixels).shape == (BATCH, 10)


@pytest.mark.parametrize("blocks", [(1,), (2, 4), (4, 1, 3), (1, 2, 3, 4)])
def test_intermediate_tokens_match_block_outputs(model, pixels, blocks):
    with torch.no_grad():
        embedding, tokens = model.encode_image_with_tokens(pixels, blocks)
        torch.testing.assert_close(embedding, model.encode_image(pixels))
        assert set(tokens) == set(blocks)
        for block in blocks:
            assert tokens[block].shape == (BATCH, 8 * 8, 64)
            torch.testing.assert_close(tokens[block], hooked_patch_tokens(model, pixels, block))


def test_tokens_are_batch_first(model, pixels):
    """Sample i's tokens depend on sample i only: a batch-first layout, not seq-first reinterpreted."""
    with torch.no_grad():
        _, batch_tokens = model.encode_image_with_tokens(pixels, (2,))
        _, single_tokens = model.encode_image_with_tokens(pixels[1:2], (2,))
    torch.testing.assert_close(batch_tokens[2][1:2], single_tokens[2], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("blocks", [(0,), (5,), (1.0,), (True,)])
def test_bad_blocks_are_rejected(model, pixels, blocks):
    with pytest.raises(ValueError, match=r"1\.\.4"):
        model.encode_image_with_tokens(pixels, blocks)


def test_wrong_input_size_is_rejected(model):
    with pytest.raises(ValueError, match=r"\(N, 3, 64, 64\)"):
        model.encode_image(torch.rand(2, 3, 32, 32))


def test_deterministic(model, pixels):
    with torch.no_grad():
        first, first_tokens = model.encode_image_with_tokens(pixels, (1, 4))
        second, second_tokens = model.encode_image_with_tokens(pixels, (1, 4))
    assert torch.equal(first, second)
    assert all(torch.equal(first_tokens[b], second_tokens[b]) for b in (1, 4))


def test_backward_reaches_every_parameter(pixels):
    for name in TINY_MODELS:
        model = create_model(name).train()
        embedding, tokens = model.encode_image_with_tokens(pixels, (2, 4))
        loss = embedding.square().mean() + sum(t.square().mean() for t in tokens.values())
        if isinstance(model, ClipModel):
            text = model.encode_text(["a", "b", "c"], normalize=True)
            logits = model.logit_scale.exp() * torch.nn.functional.normalize(embedding, dim=-1) @ text.T
            loss = loss + torch.nn.functional.cross_entropy(logits, torch.arange(BATCH))
        else:
            loss = loss + model(pixels).logsumexp(dim=-1).mean()
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not missing, f"{name}: no finite gradient for {missing}"
        patch_weight = (
            model.clip.visual.conv1.weight if isinstance(model, ClipModel) else model.model.patch_embed.proj.weight
        )
        assert patch_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", TINY_MODELS)
def test_grad_checkpointing_gives_the_same_outputs_and_gradients(name, pixels):
    torch.manual_seed(0)
    model = create_model(name).train()
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        embedding, tokens = model.encode_image_with_tokens(pixels, (2,))
        (embedding.square().sum() + tokens[2].square().sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key])


@pytest.mark.parametrize("name", TINY_MODELS)
def test_bf16_weights_take_fp32_pixels(name, pixels):
    model = create_model(name).eval().to(torch.bfloat16)
    with torch.no_grad():
        embedding, tokens = model.encode_image_with_tokens(pixels, (1, 4))
    assert embedding.dtype == torch.bfloat16 and tokens[4].dtype == torch.bfloat16
    assert torch.isfinite(embedding.float()).all()


def test_normalization_happens_inside(model, pixels):
    library, mean, std = library_model(model)
    with torch.no_grad():
        ours = model.encode_image(pixels)
        if isinstance(model, ClipModel):
            on_normalized, on_raw = library.encode_image(normalize(pixels, mean, std)), library.encode_image(pixels)
        else:
            head = library.forward_head
            on_normalized = head(library.forward_features(normalize(pixels, mean, std)), pre_logits=True)
            on_raw = head(library.forward_features(pixels), pre_logits=True)
    torch.testing.assert_close(ours, on_normalized)
    assert not torch.allclose(ours, on_raw, atol=1e-3)


def test_clip_parameter_groups_split_the_model():
    model = create_model("open_clip/tiny-vit")
    image, text = model.image_parameters(), model.text_parameters()
    assert {id(p) for p in image}.isdisjoint(id(p) for p in text)
    assert {id(p) for p in image} | {id(p) for p in text} == {id(p) for p in model.parameters()}
    assert any(p is model.logit_scale for p in text)
    assert any(p is model.clip.visual.conv1.weight for p in image)


@pytest.mark.parametrize(
    ("name", "error", "expected"),
    [
        ("open-clip/tiny-vit", UnknownNameError, "did you mean 'open_clip'"),
        ("tim/tiny-vit", UnknownNameError, "did you mean 'timm'"),
        ("ViT-B-32", ValueError, "must look like 'family/arch'"),
        ("open_clip/ViT-B-23", UnknownNameError, "did you mean 'ViT-B-32'"),
        ("open_clip/tiny-vt", UnknownNameError, "did you mean 'tiny-vit'"),
        ("timm/vit_base_patch16_22", UnknownNameError, "did you mean 'vit_base_patch16_224'"),
        ("timm/tiny-vt", UnknownNameError, "did you mean 'tiny-vit'"),
        ("timm/vit_base_patch16_224.augreg_in1k", ValueError, "model.pretrained=augreg_in1k"),
    ],
)
def test_unknown_names_say_what_was_meant(name, error, expected):
    with pytest.raises(error) as raised:
        create_model(name)
    assert expected in str(raised.value)


def test_import_does_not_load_open_clip_or_timm():
    code = (
        "import sys, robustfm.models as m\n"
        "print(sorted(x for x in ('open_clip', 'timm') if x in sys.modules))\n"
        "m.create_model('open_clip/tiny-vit'); m.create_model('timm/tiny-vit')\n"
        "print(sorted(x for x in ('open_clip', 'timm') if x in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, check=True)
    assert done.stdout.split("\n")[:2] == ["[]", "['open_clip', 'timm']"], done.stdout


@pytest.mark.timeout(120)
def test_vit_b_32_tokens_for_the_corruption_decoder():
    """ViT-B-32 (random init, ~151M parameters): a 7x7 grid of width 768 after blocks 4, 8 and 12."""
    model = create_model("open_clip/ViT-B-32").eval()
    assert (model.image_size, model.grid_size, model.width, model.num_blocks, model.embed_dim) == (
        224,
        (7, 7),
        768,
        12,
        512,
    )
    with torch.no_grad():
        embedding, tokens = model.encode_image_with_tokens(torch.rand(1, 3, 224, 224), (4, 8, 12))
    assert embedding.shape == (1, 512)
    assert {b: tuple(t.shape) for b, t in tokens.items()} == {b: (1, 49, 768) for b in (4, 8, 12)}
