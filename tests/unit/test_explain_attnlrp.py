"""AttnLRP: the routed rule Functions (gradgradcheck in both phases), the map against an independent implementation
with the classic detach tricks (open_clip and timm, uniform and CP rules), the exact parameter gradient of a loss on
the map, scoping to one instance, and refusal of towers without a rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _explain_models import parameter_function, tiny_vit64
from torch import nn

from robustfm.explain.attnlrp import attnlrp_rules
from robustfm.explain.lrp_rules import RulePhase, identity_rule, layer_norm_rule, routed, routed_scale
from robustfm.explain.relevance import clip_class_score, relevance
from robustfm.models import TINY_MODELS, ClipModel, create_model
from robustfm.models.attention import attention_adapter


def _phases():
    inactive, active = RulePhase(), RulePhase()
    active.active = True
    return {"rule phase": active, "true phase": inactive}


@pytest.mark.parametrize("phase_name", ["rule phase", "true phase"])
def test_routed_functions_have_a_consistent_double_backward(phase_name):
    phase = _phases()[phase_name]
    gen = torch.Generator().manual_seed(0)
    magnitude = torch.rand(3, 5, generator=gen, dtype=torch.float64) + 0.2  # away from the rule's 0/0 point
    x = (magnitude * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0], dtype=torch.float64)).requires_grad_()
    weight = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)

    def activation(x):
        return routed(phase, identity_rule(F.gelu), x, F.gelu(x))

    def norm(x, weight):
        return routed(phase, layer_norm_rule(1, 1e-5), x, F.layer_norm(x, (5,), weight, None, 1e-5), weight)

    def scale(x):
        return routed_scale(phase, x, 0.25)

    assert torch.autograd.gradgradcheck(activation, (x,))
    assert torch.autograd.gradgradcheck(norm, (x, weight))
    assert torch.autograd.gradgradcheck(scale, (x,))


def test_rules_act_only_in_the_rule_phase():
    phase = RulePhase()
    x = torch.tensor([-1.5, 0.3, 2.0], dtype=torch.float64, requires_grad=True)
    y = routed(phase, identity_rule(F.gelu), x, F.gelu(x))
    with phase.routing():
        (rule_grad,) = torch.autograd.grad(y.sum(), x, retain_graph=True)
    (true_grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(rule_grad, F.gelu(x) / x)  # identity rule: relevance x * grad = gelu(x)
    torch.testing.assert_close(true_grad, torch.func.grad(lambda t: F.gelu(t).sum())(x.detach()))
    assert not phase.active

    z = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    out = routed(phase, layer_norm_rule(1, 1e-5), z, F.layer_norm(z, (4,), w, None, 1e-5), w)
    g = torch.randn(2, 4, dtype=torch.float64)
    with phase.routing():
        (rule_grad,) = torch.autograd.grad(out, z, g, retain_graph=True)
    std = torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + 1e-5)
    expected = torch.autograd.grad((z - z.mean(-1, keepdim=True)) / std.detach() * w, z, g)[0]  # std constant
    torch.testing.assert_close(rule_grad, expected)
    zero = routed_scale(phase, z, 0.0)
    with phase.routing():
        assert torch.autograd.grad((zero * 2).sum() + z.sum(), z)[0].eq(1).all()  # the CP zero: only the direct path


# ---- an independent AttnLRP: the model's math written out, rules by the classic detach tricks ----


def _gscale(x, factor):
    return x * factor + (x * (1 - factor)).detach()


def _ln(norm, x):
    std = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)
    return (x - x.mean(-1, keepdim=True)) / std.detach() * norm.weight + norm.bias


def _attention(x, w_in, b_in, proj, heads, cp):
    batch, tokens, width = x.shape
    q, k, v = F.linear(x, w_in, b_in).reshape(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    q, k, v = (q.detach(), k.detach(), v) if cp else (_gscale(q, 0.25), _gscale(k, 0.25), _gscale(v, 0.5))
    probs = ((q * (width // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    return proj((probs @ v).transpose(1, 2).reshape(batch, tokens, width))


def _mlp(fc1, fc2, x):
    h = fc1(x)
    return fc2(h * (F.gelu(h) / h).detach())


def reference_attnlrp(model, pixels, classes, text, cp):
    z = model.pixels(pixels).requires_grad_()
    if isinstance(model, ClipModel):
        visual = model.clip.visual
        t = visual.conv1(z).flatten(2).transpose(1, 2)
        cls = visual.class_embedding.expand(t.shape[0], 1, -1)
        t = _ln(visual.ln_pre, torch.cat([cls, t], dim=1) + visual.positional_embedding)
        for block in visual.transformer.resblocks:
            a = block.attn
            t = t + _attention(_ln(block.ln_1, t), a.in_proj_weight, a.in_proj_bias, a.out_proj, a.num_heads, cp)
            t = t + _mlp(block.mlp.c_fc, block.mlp.c_proj, _ln(block.ln_2, t))
        embedding = _ln(visual.ln_post, t)[:, 0] @ visual.proj
        score = (embedding * F.normalize(text, dim=-1)[classes]).sum()
    else:
        vit = model.model
        t = vit.norm_pre(vit._pos_embed(vit.patch_embed(z)))
        for block in vit.blocks:
            a = block.attn
            t = t + _attention(_ln(block.norm1, t), a.qkv.weight, a.qkv.bias, a.proj, a.num_heads, cp)
            t = t + _mlp(block.mlp.fc1, block.mlp.fc2, _ln(block.norm2, t))
        score = vit.forward_head(_ln(vit.norm, t)).gather(1, classes[:, None]).sum()
    (grad,) = torch.autograd.grad(score, z)
    pixel_relevance = (z * grad).sum(1)
    gh, gw = model.grid_size
    patch = pixel_relevance.shape[-1] // gw
    return pixel_relevance.reshape(-1, gh, patch, gw, patch).sum((2, 4)).detach()


@pytest.fixture(scope="module", params=TINY_MODELS)
def model(request):
    torch.manual_seed(0)
    return create_model(request.param).eval()


@pytest.mark.parametrize("cp", [False, True], ids=["uniform", "cp"])
def test_map_equals_an_independent_implementation(model, cp):
    gen = torch.Generator().manual_seed(1)
    pixels = torch.rand(3, 3, 64, 64, generator=gen)
    classes = torch.tensor([1, 4, 7]) % 5
    text = torch.randn(5, 32, generator=gen)
    target = clip_class_score(text, classes, cosine=False) if isinstance(model, ClipModel) else classes
    ours = relevance("attnlrp", model, pixels, target, cp=cp)
    expected = reference_attnlrp(model, pixels, classes, text, cp)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(ours, expected, atol=1e-6 * float(expected.abs().max()), rtol=1e-4)
    other_rule = relevance("attnlrp", model, pixels, target, cp=not cp)
    assert not torch.allclose(ours, other_rule, atol=1e-3 * float(expected.abs().max()))


@pytest.mark.parametrize("cp", [False, True], ids=["uniform", "cp"])
def test_loss_on_the_map_has_the_exact_parameter_gradient(cp):
    """gradcheck: the autograd derivative of the map in W_qkv, the first norm's weight and W_fc1 equals finite
    differences of the map (float64), so the rules never leak into the second-order pass."""
    model = tiny_vit64(depth=2)
    pixels = torch.rand(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    classes = torch.tensor([1, 2])
    for name in ("model.blocks.0.attn.qkv.weight", "model.blocks.0.norm1.weight", "model.blocks.1.mlp.fc1.weight"):
        fn, start = parameter_function(model, name, "attnlrp", pixels, classes, cp=cp)
        assert torch.autograd.gradcheck(fn, (start,), atol=1e-6, rtol=1e-4, fast_mode=True), name


@pytest.mark.parametrize("cp", [False, True], ids=["uniform", "cp"])
def test_second_order_gradient_reaches_query_key_weights_and_norms(model, cp):
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    target = clip_class_score(torch.randn(3, 32), torch.tensor([0, 2])) if isinstance(model, ClipModel) else None
    maps = relevance(
        "attnlrp", model, pixels, target if target is not None else torch.tensor([0, 2]), create_graph=True, cp=cp
    )
    model.zero_grad(set_to_none=True)
    try:
        maps.pow(2).sum().backward()
        first = attention_adapter(model).attention_modules[0]
        weight = first.in_proj_weight if isinstance(model, ClipModel) else first.qkv.weight
        width = weight.shape[1]
        assert weight.grad[:width].abs().sum() > 0 and weight.grad[width : 2 * width].abs().sum() > 0  # W_q, W_k
        norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm) and m.weight.grad is not None]
        assert norms and all(m.weight.grad.abs().sum() > 0 for m in norms[:3])
    finally:
        model.zero_grad(set_to_none=True)


def _hook_state(model):
    return {
        name: (dict(m._forward_hooks), dict(m._forward_pre_hooks), m.__dict__.get("forward"))
        for name, m in model.named_modules()
    }


def test_rules_are_scoped_and_leave_the_forward_unchanged(model):
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    before, reference = _hook_state(model), model(pixels)
    other = create_model("open_clip/tiny-vit" if isinstance(model, ClipModel) else "timm/tiny-vit").eval()
    other_before, other_reference = _hook_state(other), other(pixels)
    with attnlrp_rules(model, RulePhase()):
        torch.testing.assert_close(model(pixels), reference, atol=1e-6, rtol=1e-6)
        assert _hook_state(other) == other_before
        assert torch.equal(other(pixels), other_reference)
    assert _hook_state(model) == before
    with pytest.raises(RuntimeError, match="inside the rules"):
        with attnlrp_rules(model, RulePhase(), cp=True):
            model(pixels)
            raise RuntimeError("failure inside the rules")
    assert _hook_state(model) == before
    assert torch.equal(model(pixels), reference)


def test_a_plain_backward_through_a_rules_forward_is_the_true_gradient(model):
    """The rules only act inside RulePhase.routing(): a cross-entropy on the same forward gets true gradients."""
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    params = [p for p in model.parameters() if p.requires_grad]
    expected = torch.autograd.grad(model(pixels).square().sum(), params, allow_unused=True)
    with attnlrp_rules(model, RulePhase()):
        got = torch.autograd.grad(model(pixels).square().sum(), params, allow_unused=True)
    for g, e in zip(got, expected, strict=True):
        if e is not None:
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)


def test_towers_without_a_rule_are_refused():
    model = tiny_vit64(depth=1)
    model.model.blocks[0].mlp.act = nn.Tanh()
    with pytest.raises(ValueError, match=r"no rule for blocks\.0\.mlp\.act \(Tanh\)"):
        relevance("attnlrp", model, torch.rand(1, 3, 64, 64, dtype=torch.float64), torch.tensor([0]))
    model.model.blocks[0].mlp.act = nn.ReLU(inplace=True)
    with pytest.raises(ValueError, match="in-place ReLU"):
        relevance("attnlrp", model, torch.rand(1, 3, 64, 64, dtype=torch.float64), torch.tensor([0]))
    assert all(not m._forward_hooks for m in model.modules())
