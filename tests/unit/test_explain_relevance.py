"""Every registered relevance method on every tiny ViT: grid shape, finiteness, parameter gradients of a loss on the map
(exact, by gradcheck, on a float64 width-8 ViT), the formulas on one block, nothing left on the model, clear errors;
and the map post-processing (to_pixels)."""

from __future__ import annotations

import pytest
import torch
from _explain_models import parameter_function, tiny_vit64

from robustfm.explain import RELEVANCE, clip_class_score, normalize_maps, relevance, to_pixels
from robustfm.models import TINY_MODELS, ClipModel, create_model
from robustfm.models.attention import attention_adapter, attention_taps
from robustfm.registry import UnknownNameError

METHODS = RELEVANCE.names()


def test_registry_lists_the_methods():
    assert METHODS == ["attn_gradcam", "attnlrp", "gae", "gradcam", "input_gradient", "rollout"]
    assert RELEVANCE.meta("rollout")["uses_score"] is False


@pytest.fixture(scope="module", params=TINY_MODELS)
def model(request):
    torch.manual_seed(0)
    return create_model(request.param).eval()


@pytest.fixture(scope="module")
def pixels():
    return torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def target_for(model, classes=(0, 1, 3)):
    """Class logits, or CLIP cosines with random class texts (chosen so that no clamped map is all zero)."""
    classes = torch.tensor(classes)
    if isinstance(model, ClipModel):
        return clip_class_score(torch.randn(4, 32, generator=torch.Generator().manual_seed(1)), classes)
    return classes


def model_state(model):
    return {
        name: (dict(m._forward_hooks), dict(m._forward_pre_hooks), m.__dict__.get("forward"))
        for name, m in model.named_modules()
    }


@pytest.mark.parametrize("method", METHODS)
def test_maps_have_the_grid_shape_are_finite_and_detached(model, pixels, method):
    before = model_state(model)
    with torch.no_grad():  # callers under no_grad still get a map: gradients are enabled inside
        maps = relevance(method, model, pixels, target_for(model))
    assert maps.shape == (3, 8, 8) and torch.isfinite(maps).all()
    assert not maps.requires_grad
    assert maps.abs().sum() > 0
    assert model_state(model) == before


@pytest.mark.parametrize("method", METHODS)
def test_a_frozen_model_gives_the_same_maps(model, pixels, method):
    """Evaluation actors freeze every parameter: the maps must not depend on a parameter requiring grad."""
    with torch.no_grad():
        expected = relevance(method, model, pixels, target_for(model))
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        with torch.no_grad():
            frozen = relevance(method, model, pixels, target_for(model))
    finally:
        for parameter, flag in zip(model.parameters(), flags, strict=True):
            parameter.requires_grad_(flag)
    torch.testing.assert_close(frozen, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_a_loss_on_the_map_trains_the_attention_weights(model, pixels, method):
    maps = relevance(method, model, pixels, target_for(model), create_graph=True)
    assert maps.requires_grad
    first = attention_adapter(model).attention_modules[0]
    weight = first.in_proj_weight if isinstance(model, ClipModel) else first.qkv.weight
    model.zero_grad(set_to_none=True)
    try:
        normalize_maps(maps)[0].square().mean().backward()
        assert weight.grad is not None and torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    "method, options, classes",
    [
        ("gae", {"grad_graph": True}, (1, 2)),
        ("rollout", {}, (1, 2)),
        ("attn_gradcam", {}, (3, 6)),  # classes whose clamped maps are positive everywhere: no kink, not all zero
        ("gradcam", {}, (1, 2)),
        ("input_gradient", {}, (1, 2)),
    ],
)
def test_the_parameter_gradient_of_the_map_is_exact(method, options, classes):
    """gradcheck (float64, two blocks): block 1's attention and MLP weights reach the map through block 2."""
    model = tiny_vit64(depth=2)
    pixels = torch.rand(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for name in ("model.blocks.0.attn.qkv.weight", "model.blocks.0.mlp.fc1.weight"):
        fn, start = parameter_function(model, name, method, pixels, torch.tensor(classes), **options)
        assert torch.autograd.gradcheck(fn, (start,), atol=1e-6, rtol=1e-4, fast_mode=True), name


def test_gae_grad_graph_false_treats_the_attention_gradient_as_a_constant(pixels):
    """The CFT code's variant: same map, but the parameter gradient flows through A only."""
    model = tiny_vit64(depth=2)
    pixels = pixels[:2].double()
    classes = torch.tensor([1, 2])
    weight = model.model.blocks[0].attn.qkv.weight
    grads = {}
    for grad_graph in (False, True):
        maps = relevance("gae", model, pixels, classes, create_graph=True, grad_graph=grad_graph)
        (grads[grad_graph],) = torch.autograd.grad(maps.square().sum(), weight)
        grads[f"map{grad_graph}"] = maps.detach()
    torch.testing.assert_close(grads["mapFalse"], grads["mapTrue"])
    # By hand: dy/dA taken once without a graph, then the rollout of A differentiated.
    with attention_taps(model, keep_graph=True) as taps:
        score = model(pixels).gather(1, classes[:, None]).sum()
    constants = torch.autograd.grad(score, taps.probs, retain_graph=True)
    rollout = torch.eye(taps.num_tokens, dtype=torch.float64).expand(2, -1, -1)
    for probs, grad in zip(taps.probs, constants, strict=True):
        rollout = rollout + (grad * probs).clamp(min=0).mean(1) @ rollout
    (expected,) = torch.autograd.grad(rollout[:, 0, 2:].square().sum(), weight)
    torch.testing.assert_close(grads[False], expected)
    assert not torch.allclose(grads[False], grads[True], rtol=1e-3)


def test_one_block_formulas():
    """On one block: GAE = I + cam, so its class row over the patches is cam's; rollout = 0.5 mean_h(A) there;
    attention Grad-CAM = clamp(mean_h(mean_p(dy/dA) * A))."""
    model = tiny_vit64(depth=1)
    pixels = torch.rand(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    classes = torch.tensor([3, 5])
    with attention_taps(model, keep_graph=True) as taps:
        score = model(pixels).gather(1, classes[:, None]).sum()
    (probs,) = taps.probs
    (grad,) = torch.autograd.grad(score, probs)
    patches = slice(2, None)  # class + register token first
    cam = (grad * probs).clamp(min=0).mean(1)[:, 0, patches]
    torch.testing.assert_close(relevance("gae", model, pixels, classes).flatten(1), cam)
    torch.testing.assert_close(
        relevance("rollout", model, pixels, classes).flatten(1), 0.5 * probs.mean(1)[:, 0, patches]
    )
    weights = grad[:, :, 0, patches].mean(-1, keepdim=True)
    expected = (weights * probs[:, :, 0, patches]).mean(1).clamp(min=0)
    torch.testing.assert_close(relevance("attn_gradcam", model, pixels, classes).flatten(1), expected)


def test_input_gradient_resolutions(model, pixels):
    target = target_for(model)
    pixel_map = relevance("input_gradient", model, pixels, target, resolution="pixel")
    assert pixel_map.shape == (3, 64, 64) and (pixel_map >= 0).all()
    patch_map = relevance("input_gradient", model, pixels, target)
    torch.testing.assert_close(patch_map, pixel_map.reshape(3, 8, 8, 8, 8).mean((2, 4)))
    with pytest.raises(ValueError, match="resolution must be 'patch' or 'pixel'"):
        relevance("input_gradient", model, pixels, target, resolution="token")


def test_everything_is_restored_after_an_exception(model, pixels):
    before, reference = model_state(model), model(pixels)
    last_attention = attention_adapter(model).attention_modules[-1]

    def fail(module, args, output):
        raise RuntimeError("forward failed")

    for method in METHODS:
        handle = last_attention.register_forward_hook(fail)
        try:
            with pytest.raises(RuntimeError, match="forward failed"):
                relevance(method, model, pixels, target_for(model), create_graph=True)
        finally:
            handle.remove()
        assert model_state(model) == before, method
    torch.testing.assert_close(model(pixels), reference, atol=0, rtol=0)


def test_bad_calls_fail_clearly(model, pixels):
    with pytest.raises(UnknownNameError, match="did you mean 'rollout'"):
        relevance("rolout", model, pixels, target_for(model))
    with torch.inference_mode():
        inference_pixels = torch.rand(1, 3, 64, 64)
        with pytest.raises(RuntimeError, match="inference_mode"):
            relevance("gae", model, inference_pixels, target_for(model, (0,)))
    with pytest.raises(RuntimeError, match="inference tensor"):
        relevance("gae", model, inference_pixels, target_for(model, (0,)))
    with pytest.raises(ValueError, match="one score per row"):
        relevance("gae", model, pixels, lambda outputs, index: outputs)
    if isinstance(model, ClipModel):
        with pytest.raises(ValueError, match="pass a score callable"):
            relevance("gae", model, pixels, torch.tensor([0, 1, 2]))
    else:
        with pytest.raises(ValueError, match="target has 2 classes for 3 images"):
            relevance("gae", model, pixels, torch.tensor([0, 1]))


def test_attnlrp_and_gradcam_refuse_a_cnn():
    cnn = create_model("timm/test_resnet").eval()
    for method in ("attnlrp", "gradcam", "gae"):
        with pytest.raises(ValueError, match="ViT"):
            relevance(method, cnn, torch.rand(1, 3, 160, 160), torch.tensor([0]))
    maps = relevance("input_gradient", cnn, torch.rand(1, 3, 160, 160), torch.tensor([0]), resolution="pixel")
    assert maps.shape == (1, 160, 160)


def test_to_pixels_upsamples_normalises_and_flags_constant_maps():
    maps = torch.stack([torch.arange(16.0).reshape(4, 4), torch.full((4, 4), 3.0), -torch.eye(4)])
    maps.requires_grad_(True)
    out, constant = to_pixels(maps, 16)
    assert out.shape == (3, 16, 16) and constant.tolist() == [False, True, False]
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out[1], torch.zeros(16, 16))  # constant map -> 0, not NaN
    for row in (0, 2):
        assert out[row].min() == 0 and out[row].max() > 1 - 1e-6
    assert out[0, 0, 0] == 0 and out[0, -1, -1] > 1 - 1e-6  # the largest value stays where it was
    out.sum().backward()
    assert torch.isfinite(maps.grad).all()
    wide, _ = to_pixels(maps.detach(), (8, 12))
    assert wide.shape == (3, 8, 12)
    with pytest.raises(ValueError, match=r"maps must be \(N, gh, gw\)"):
        to_pixels(torch.zeros(4, 4), 16)


def test_clip_class_score_is_the_cosine_or_the_projection():
    emb = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    text = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    index = torch.tensor([0, 1])
    cosine = clip_class_score(text, torch.tensor([1, 0]))(emb, index)
    torch.testing.assert_close(cosine, torch.tensor([0.8, 1.0]))
    linear = clip_class_score(text, torch.tensor([1, 0]), cosine=False)(emb, index)
    torch.testing.assert_close(linear, torch.tensor([4.0, 1.0]))
    with pytest.raises(ValueError, match="class 2 has no text embedding"):
        clip_class_score(text, torch.tensor([2]))
    with pytest.raises(ValueError, match="integer tensor"):
        clip_class_score(text, torch.tensor([0.5]))
