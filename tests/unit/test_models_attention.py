"""Attention taps on every tiny ViT (open_clip and timm): outputs unchanged, probabilities equal to a recomputation by
hand, masks equal to the libraries' own masked forward, double backward, and nothing left behind on exit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustfm.models import TINY_MODELS, ClipModel, create_model
from robustfm.models.attention import attention_adapter, attention_taps, key_mask, key_mask_from_patch_groups

BATCH = 3
PATCHES = 64  # 8x8 grid of the tiny ViTs
# float32 outputs of magnitude ~2.5 carry ~2.4e-7 per ulp; the libraries' fused kernels sum in another order, and
# open_clip's own no_grad fast path differs from its grad path by up to ~1.2e-6 on these models.
EXACT = dict(atol=1e-6, rtol=1e-6)
CLOSE = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", params=TINY_MODELS)
def model(request):
    torch.manual_seed(0)
    return create_model(request.param).eval()


@pytest.fixture(scope="module")
def pixels():
    return torch.rand(BATCH, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def drop():
    """A different random set of dropped patches per sample (about a third of them)."""
    return torch.rand(BATCH, PATCHES, generator=torch.Generator().manual_seed(2)) < 0.35


def blocks_of(model):
    if isinstance(model, ClipModel):
        return list(model.clip.visual.transformer.resblocks)
    return list(model.model.blocks)


def manual_probs(model, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Attention probabilities (B, H, T, T) recomputed from a block's input with the block's own weights."""
    if isinstance(model, ClipModel):
        attn = block.attn
        q, k, _ = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        heads, head_dim = attn.num_heads, attn.head_dim
        q, k = (t.reshape(x.shape[0], x.shape[1], heads, head_dim).transpose(1, 2) for t in (q, k))
    else:
        attn = block.attn
        heads, head_dim = attn.num_heads, attn.head_dim
        qkv = attn.qkv(block.norm1(x)).reshape(x.shape[0], x.shape[1], 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return torch.softmax(q @ k.transpose(-2, -1) / head_dim**0.5, dim=-1)


def library_masked_forward(model, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The model's output with ``mask`` (B, 1, 1, T) added to every block's logits by the library's own code."""
    x = model.pixels(pixels, torch.float32)
    if isinstance(model, ClipModel):
        visual = model.clip.visual
        heads = visual.transformer.resblocks[0].attn.num_heads
        tokens = mask.shape[-1]
        # nn.MultiheadAttention takes a per-sample float mask as (B * heads, T, T).
        mha_mask = mask.expand(-1, heads, tokens, tokens).reshape(-1, tokens, tokens)
        pooled, _ = visual._pool(visual.transformer(visual._embeds(x), attn_mask=mha_mask))
        return pooled @ visual.proj
    return model.model.forward_head(model.model.forward_features(x, attn_mask=mask))


def test_taps_leave_outputs_unchanged_and_record_every_block(model, pixels):
    reference = model(pixels)
    with attention_taps(model) as taps:
        out = model(pixels)
    torch.testing.assert_close(out, reference, **EXACT)
    expected_prefix = 1 if isinstance(model, ClipModel) else 2  # timm's tiny ViT: class + 1 register token
    assert (taps.num_prefix_tokens, taps.grid_size, taps.num_tokens) == (expected_prefix, (8, 8), expected_prefix + 64)
    assert len(taps.probs) == len(blocks_of(model)) == taps.num_blocks
    for probs in taps.probs:
        assert probs.shape == (BATCH, 2, taps.num_tokens, taps.num_tokens)


def test_recorded_probs_equal_a_manual_recomputation(model, pixels):
    blocks = blocks_of(model)
    captured = {}
    handle = blocks[1].register_forward_pre_hook(lambda _module, args: captured.setdefault("x", args[0].detach()))
    try:
        with attention_taps(model) as taps:
            model(pixels)
    finally:
        handle.remove()
    x = captured["x"]
    if isinstance(model, ClipModel) and not model.clip.visual.transformer.batch_first:
        x = x.transpose(0, 1)  # open_clip versions differ in block layout: read it, don't assume it
    expected = manual_probs(model, blocks[1], x)
    torch.testing.assert_close(taps.probs[1], expected, **CLOSE)
    for probs in taps.probs:
        torch.testing.assert_close(probs.sum(dim=-1), torch.ones(probs.shape[:-1]), **CLOSE)


def test_key_mask_equals_the_library_masked_forward(model, pixels, drop):
    prefix = attention_adapter(model).num_prefix_tokens
    mask = key_mask(drop, prefix)
    with attention_taps(model, logit_mask=mask) as taps:
        out = model(pixels)
    torch.testing.assert_close(out, library_masked_forward(model, pixels, mask), **CLOSE)
    assert not torch.allclose(out, model(pixels), atol=1e-3)  # the mask does change the output
    for probs in taps.probs:
        patch_columns = probs[..., prefix:].permute(0, 3, 1, 2)  # (B, P, H, T): one patch column per row of drop
        assert torch.all(patch_columns[drop] == 0)  # -inf logits: exactly zero weight
        assert torch.all(patch_columns[~drop] > 0)
        assert torch.all(probs[..., :prefix] > 0)


def test_zero_mask_reproduces_the_unmasked_forward(model, pixels):
    tokens = attention_adapter(model).num_prefix_tokens + PATCHES
    with attention_taps(model, logit_mask=torch.zeros(BATCH, 1, tokens, tokens)):
        out = model(pixels)
    torch.testing.assert_close(out, model(pixels), **EXACT)


def test_every_mask_layout_gives_the_same_result(model, pixels, drop):
    prefix = attention_adapter(model).num_prefix_tokens
    columns = key_mask(drop, prefix)  # (B, 1, 1, T)
    tokens, heads = columns.shape[-1], attention_adapter(model).num_heads
    layouts = {
        "(B, T, T)": columns[:, 0].expand(-1, tokens, -1),
        "(B, 1, T, T)": columns.expand(-1, 1, tokens, -1),
        "(B, H, T, T)": columns.expand(-1, heads, tokens, -1),
    }
    with attention_taps(model, logit_mask=columns) as taps:
        reference = model(pixels)
        for layout, mask in layouts.items():
            taps.logit_mask = mask
            torch.testing.assert_close(model(pixels), reference, **EXACT, msg=layout)


def test_per_sample_masks_in_a_batch_equal_each_sample_alone(model, pixels, drop):
    drop[0] = False  # the clean pass rides in the same batch, as in CCI
    mask = key_mask(drop, attention_adapter(model).num_prefix_tokens)
    with attention_taps(model, logit_mask=mask) as taps:
        batched = model(pixels)
        for row in range(BATCH):
            taps.logit_mask = mask[row : row + 1]
            torch.testing.assert_close(batched[row : row + 1], model(pixels[row : row + 1]), **EXACT)
    torch.testing.assert_close(batched[0], model(pixels)[0], **EXACT)


def test_callable_mask_acts_on_the_blocks_it_chooses(model, pixels):
    prefix = attention_adapter(model).num_prefix_tokens
    seen = []

    def drop_first_patch_in_block_3(block, logits):
        seen.append(block)
        if block != 3:
            return logits
        return logits.index_fill(-1, torch.tensor([prefix]), float("-inf"))

    with attention_taps(model) as clean:
        model(pixels)
    with attention_taps(model, logit_mask=drop_first_patch_in_block_3) as taps:
        model(pixels)
    assert seen == list(range(1, taps.num_blocks + 1))
    for block in (0, 1):
        torch.testing.assert_close(taps.probs[block], clean.probs[block], **EXACT)
    assert torch.all(taps.probs[2][..., prefix] == 0) and torch.all(clean.probs[2][..., prefix] > 0)
    assert not torch.equal(taps.probs[3], clean.probs[3])  # block 4 sees block 3's changed output


def test_bad_masks_fail_with_their_shape_or_dtype(model, pixels):
    tokens = attention_adapter(model).num_prefix_tokens + PATCHES
    with pytest.raises(ValueError, match=rf"logit_mask of shape \(2, 1, 1, {tokens}\)"):
        with attention_taps(model, logit_mask=torch.zeros(2, 1, 1, tokens)):
            model(pixels)
    with pytest.raises(ValueError, match=r"logit_mask of shape \(3, 1, 1, 10\)"):
        with attention_taps(model, logit_mask=torch.zeros(BATCH, 1, 1, 10)):
            model(pixels)
    with pytest.raises(TypeError, match="torch.bool"):
        with attention_taps(model, logit_mask=torch.zeros(BATCH, 1, 1, tokens, dtype=torch.bool)):
            model(pixels)
    with pytest.raises(TypeError, match="float tensor or a callable"):
        with attention_taps(model, logit_mask=[[0.0]]):
            model(pixels)
    with pytest.raises(ValueError, match="callable returned"):
        with attention_taps(model, logit_mask=lambda block, logits: logits[..., 1:]):
            model(pixels)


def test_double_backward_reaches_the_query_and_key_weights(model, pixels, drop):
    def input_gradient_loss():
        x = pixels.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(x)[:, 0].sum(), x, create_graph=True)
        return grad.pow(2).sum()

    # The premise: the libraries' fused attention has no double backward (pytorch#116350).
    with pytest.raises(RuntimeError, match="not implemented"):
        input_gradient_loss().backward()
    model.zero_grad(set_to_none=True)
    first_attention = attention_adapter(model).attention_modules[0]
    weight = first_attention.in_proj_weight if isinstance(model, ClipModel) else first_attention.qkv.weight
    width = weight.shape[1]
    try:
        mask = key_mask(drop, attention_adapter(model).num_prefix_tokens)
        with attention_taps(model, logit_mask=mask, keep_graph=True) as taps:
            score = model(pixels)[:, 0].sum()
        # A GAE-style relevance loss (clamp(dy/dA * A, 0)): its parameter gradient is a second derivative.
        grads = torch.autograd.grad(score, taps.probs, create_graph=True)
        sum((g * p).clamp(min=0).sum() for g, p in zip(grads, taps.probs, strict=True)).backward()
        for rows in (slice(0, width), slice(width, 2 * width)):  # W_q, W_k
            assert torch.isfinite(weight.grad[rows]).all() and weight.grad[rows].abs().sum() > 0
        model.zero_grad(set_to_none=True)
        with attention_taps(model, record=False):
            input_gradient_loss().backward()
        assert weight.grad[:width].abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)


def test_keep_graph_decides_whether_probs_are_in_the_graph(model, pixels):
    with attention_taps(model) as detached:
        model(pixels)
    with attention_taps(model, keep_graph=True) as kept:
        model(pixels)
    assert all(p.grad_fn is None and not p.requires_grad for p in detached.probs)
    assert all(p.grad_fn is not None for p in kept.probs)


def _state(model):
    """Everything the taps could leave behind: instance forwards, hooks, fused-attention flags, checkpointing."""
    global_hooks = nn.modules.module
    state = {
        "global": (len(global_hooks._global_forward_hooks), len(global_hooks._global_forward_pre_hooks)),
        "checkpointing": checkpointing_on(model),
    }
    for name, module in model.named_modules():
        state[name] = (
            module.__dict__.get("forward"),
            dict(module._forward_hooks),
            dict(module._forward_pre_hooks),
            dict(module._backward_hooks),
            module.__dict__.get("fused_attn"),
        )
    return state


def checkpointing_on(model) -> bool:
    return (
        model.clip.visual.transformer.grad_checkpointing
        if isinstance(model, ClipModel)
        else model.model.grad_checkpointing
    )


def test_everything_is_restored_on_exit_and_on_exception(model, pixels):
    before, reference = _state(model), model(pixels)
    modules = attention_adapter(model).attention_modules
    with attention_taps(model, logit_mask=torch.zeros(1, 1, 1, 1)):  # one value broadcast over everything
        assert all("forward" in module.__dict__ for module in modules)
        model(pixels)
    assert _state(model) == before
    with pytest.raises(RuntimeError, match="inside the context"):
        with attention_taps(model, keep_graph=True):
            model(pixels)
            raise RuntimeError("failure inside the context")
    assert _state(model) == before
    assert all("forward" not in module.__dict__ for module in modules)
    assert torch.equal(model(pixels), reference)


def test_another_instance_is_untouched_inside_the_context(model, pixels):
    family = "open_clip/tiny-vit" if isinstance(model, ClipModel) else "timm/tiny-vit"
    torch.manual_seed(3)
    other = create_model(family).eval()
    other_reference, other_state = other(pixels), _state(other)
    with attention_taps(model) as taps:
        model(pixels)
        recorded = list(taps.probs)
        assert torch.equal(other(pixels), other_reference)
        assert _state(other) == other_state
        assert all(a is b for a, b in zip(taps.probs, recorded, strict=True))  # other's forward recorded nothing


def test_gradient_checkpointing_is_off_inside_and_restored(model, pixels):
    model.set_grad_checkpointing(True)
    try:
        with attention_taps(model, keep_graph=True) as taps:
            assert not checkpointing_on(model)
            model(pixels)[:, 0].sum().backward()  # no block reruns in backward to overwrite the records
            assert len(taps.probs) == taps.num_blocks
        assert checkpointing_on(model)
    finally:
        model.set_grad_checkpointing(False)
        model.zero_grad(set_to_none=True)


def test_nested_taps_are_refused_and_the_outer_ones_keep_working(model, pixels):
    with attention_taps(model) as outer:
        with pytest.raises(RuntimeError, match="already active"):
            with attention_taps(model):
                pass
        model(pixels)
        assert len(outer.probs) == outer.num_blocks
    assert all("forward" not in module.__dict__ for module in attention_adapter(model).attention_modules)


def test_probs_need_a_forward_and_record(model, pixels):
    with attention_taps(model) as taps:
        with pytest.raises(RuntimeError, match="run the model's forward"):
            _ = taps.probs
    with attention_taps(model, record=False) as taps:
        model(pixels)
        with pytest.raises(RuntimeError, match="record=True"):
            _ = taps.probs


def test_models_without_a_vit_tower_are_refused():
    with pytest.raises(ValueError, match="attention taps need a ViT image tower.*got Linear"):
        with attention_taps(nn.Linear(2, 2)):
            pass
    cnn = create_model("timm/test_resnet")
    with pytest.raises(ValueError, match="timm/test_resnet: attention taps need a ViT image tower.*got ResNet"):
        with attention_taps(cnn):
            pass


def test_key_mask_layout_and_checks():
    drop = torch.tensor([[True, False, True], [False, False, False]])
    mask = key_mask(drop, num_prefix_tokens=2)
    inf = float("-inf")
    assert torch.equal(mask, torch.tensor([[[[0, 0, inf, 0, inf]]], [[[0.0, 0, 0, 0, 0]]]]))
    with pytest.raises(ValueError, match="sample 1 drops every key"):
        key_mask(torch.tensor([[True, False], [True, True]]), num_prefix_tokens=0)
    with pytest.raises(ValueError, match="drop must be a bool tensor"):
        key_mask(torch.zeros(2, 3), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        key_mask(drop, num_prefix_tokens=-1)

    groups = torch.tensor([[0, 1, 0], [0, 1, 0], [0, 1, 0]])
    by_group = key_mask_from_patch_groups(groups, torch.tensor([-1, 0, 1]), num_prefix_tokens=1)
    assert torch.equal(by_group[:, 0, 0], torch.tensor([[0, 0, 0, 0], [0, inf, 0, inf], [0, 0, inf, 0]]))
    with pytest.raises(ValueError, match=r"drop_groups must be an integer tensor \(3,\)"):
        key_mask_from_patch_groups(groups, torch.tensor([0, 1]), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="groups must be an integer tensor"):
        key_mask_from_patch_groups(groups.float(), torch.tensor([0, 1, 2]), num_prefix_tokens=1)


def test_cci_batch_of_cluster_masks_stays_finite(model, pixels):
    """One image, K cluster-masked passes + the clean pass in one batch; a pass that drops every patch still has the
    prefix keys, so its softmax stays finite."""
    prefix = attention_adapter(model).num_prefix_tokens
    labels = torch.arange(PATCHES) % 4  # 4 clusters; a 5th label (4) covers every patch below
    groups = torch.cat([labels.expand(5, PATCHES), torch.full((1, PATCHES), 4)])
    mask = key_mask_from_patch_groups(groups, torch.tensor([-1, 0, 1, 2, 3, 4]), prefix)
    image = pixels[:1].expand(6, -1, -1, -1)
    with attention_taps(model, logit_mask=mask) as taps:
        out = model(image)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], model(pixels[:1])[0], **EXACT)
    assert all(torch.isfinite(p).all() for p in taps.probs)
    torch.testing.assert_close(taps.probs[0][5, ..., :prefix].sum(-1), torch.ones(2, prefix + PATCHES), **EXACT)


def test_attention_module_contract_matches_the_library(model, pixels):
    """Called directly with the library's own mask arguments, a tapped attention module returns what the library's
    module returns (bool and float masks, sequence-first layout, causal attention, averaged weights)."""
    attn = attention_adapter(model).attention_modules[0]
    x = torch.randn(2, 7, attn.embed_dim if isinstance(model, ClipModel) else attn.qkv.in_features)
    keep = torch.rand(7, 7, generator=torch.Generator().manual_seed(4)) < 0.6
    keep |= torch.eye(7, dtype=torch.bool)  # every query keeps at least itself
    if isinstance(model, ClipModel):
        float_mask = torch.randn(2 * attn.num_heads, 7, 7)
        seq_first = x.transpose(0, 1).contiguous()
        calls = {
            "bool": lambda: attn(x, x, x, attn_mask=~keep, need_weights=True, average_attn_weights=False),
            "float (B*H, T, T)": lambda: attn(x, x, x, attn_mask=float_mask, need_weights=True),
            "sequence-first": lambda: attn(seq_first, seq_first, seq_first, need_weights=False),
        }
    else:
        calls = {
            "bool": lambda: attn(x, attn_mask=keep),
            "float (B, 1, T, T)": lambda: attn(x, attn_mask=torch.randn(2, 1, 7, 7)),
            "causal": lambda: attn(x, is_causal=True),
        }
    for name, call in calls.items():
        if name == "sequence-first":
            attn.batch_first = False
        try:
            torch.manual_seed(5)
            expected = call()
            with attention_taps(model):
                torch.manual_seed(5)
                got = call()
        finally:
            if name == "sequence-first":
                attn.batch_first = True
        torch.testing.assert_close(got, expected, **CLOSE, msg=name)
