"""Attention taps for timm ``VisionTransformer`` s: an explicit forward of timm 1.0.31's ``Attention``.

timm's ``Attention`` takes its fused path (``F.scaled_dot_product_attention``, no double backward) when its
``fused_attn`` flag is set; the explicit forward below follows its unfused math path line by line and never reads
the flag. Imported by :meth:`robustfm.models.timm_classifier.TimmClassifier.attention_adapter` once a model exists,
so timm is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from timm.layers import Attention, resolve_self_attn_mask
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer

from robustfm.models.attention import Attend, AttentionAdapter, ProjectedHeads

if TYPE_CHECKING:
    from robustfm.models.timm_classifier import TimmClassifier

# Blocks that compute their attention by calling their `attn` module (ParallelScalingBlock and friends fuse it).
_BLOCKS = (Block, ResPostBlock)


def timm_attention_adapter(model: TimmClassifier) -> AttentionAdapter:
    """The adapter of a ``TimmClassifier`` around a timm ``VisionTransformer`` (ViT, DeiT, ...) whose blocks use
    timm's ``Attention``; ``ValueError`` naming the part that is not."""
    name = f"timm/{model.arch}"
    vit = model.model
    if not isinstance(vit, VisionTransformer):
        raise ValueError(
            f"{name}: attention taps need a ViT image tower (a timm VisionTransformer), got {type(vit).__name__}"
        )
    blocks = list(vit.blocks)
    for number, block in enumerate(blocks, start=1):
        if not isinstance(block, _BLOCKS):
            raise ValueError(
                f"{name}: block {number} is a {type(block).__name__}; attention taps support timm's Block and "
                "ResPostBlock (attention in a separate Attention module)"
            )
        # Exact type: the explicit forward reproduces timm's Attention, not a subclass's or AttentionRope's math.
        if type(block.attn) is not Attention:
            raise ValueError(f"{name}: block {number}'s attention is {type(block.attn).__name__}, not timm Attention")
    return AttentionAdapter(
        name=name,
        attention_modules=tuple(block.attn for block in blocks),
        explicit_forward=timm_self_attention,
        num_heads=blocks[0].attn.num_heads,
        num_prefix_tokens=int(vit.num_prefix_tokens),
        grid_size=model.grid_size,
        checkpoint_flag=(vit, "grad_checkpointing"),
    )


def timm_self_attention(
    module: Attention,
    attend: Attend,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """timm ``Attention.forward`` (qk-norm, output norm and gate included) with the attention through ``attend``;
    a mask passed by timm itself (``forward_features(x, attn_mask=...)``) is resolved as timm does."""
    batch, tokens, _ = x.shape
    gate = module.gate(x).sigmoid() if module.gate is not None else None
    qkv = module.qkv(x).reshape(batch, tokens, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = module.q_norm(q), module.k_norm(k)
    bias = resolve_self_attn_mask(tokens, q, attn_mask, is_causal)
    out, _ = attend(ProjectedHeads(q, k, v, module.scale, bias, module.attn_drop))
    out = module.norm(out.transpose(1, 2).reshape(batch, tokens, module.attn_dim))
    if gate is not None:
        out = out * gate
    return module.proj_drop(module.proj(out))
