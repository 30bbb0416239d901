"""Attention taps for open_clip ViT image towers: an explicit ``nn.MultiheadAttention`` self-attention forward.

open_clip 3.3's ``ResidualAttentionBlock`` calls ``self.attn(x, x, x, need_weights=False, attn_mask=...)`` on an
``nn.MultiheadAttention``, which runs ``F.scaled_dot_product_attention`` (no double backward, no probabilities out).
Imported by :meth:`robustfm.models.clip.ClipModel.attention_adapter` once a model exists, so open_clip is loaded.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from robustfm.models.attention import Attend, AttentionAdapter, ProjectedHeads

if TYPE_CHECKING:
    from robustfm.models.clip import ClipModel


def openclip_attention_adapter(model: ClipModel) -> AttentionAdapter:
    """The adapter of a ``ClipModel`` whose image tower is an open_clip ``VisionTransformer`` made of
    ``ResidualAttentionBlock`` s (every open_clip ViT config); ``ValueError`` naming the part that is not."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    name = f"open_clip/{model.arch}"
    visual = model.clip.visual
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"{name}: attention taps need a ViT image tower, got {type(visual).__name__}")
    blocks = list(visual.transformer.resblocks)
    for number, block in enumerate(blocks, start=1):
        if not isinstance(block, ResidualAttentionBlock):
            raise ValueError(
                f"{name}: attention taps need open_clip ResidualAttentionBlocks (a ViT image tower without custom "
                f"blocks); block {number} is {type(block).__name__}"
            )
        attn = block.attn
        # Exact type: the explicit forward below reproduces nn.MultiheadAttention's math, not a subclass's.
        if type(attn) is not nn.MultiheadAttention:
            raise ValueError(f"{name}: block {number}'s attention is {type(attn).__name__}, not nn.MultiheadAttention")
        unsupported = {
            "separate q/k/v projection weights": not attn._qkv_same_embed_dim,
            "bias_k/bias_v": attn.bias_k is not None or attn.bias_v is not None,
            "add_zero_attn": attn.add_zero_attn,
        }
        used = [feature for feature, present in unsupported.items() if present]
        if used:
            raise ValueError(f"{name}: block {number}'s nn.MultiheadAttention uses {', '.join(used)}; not supported")
    return AttentionAdapter(
        name=name,
        attention_modules=tuple(block.attn for block in blocks),
        explicit_forward=multihead_self_attention,
        num_heads=blocks[0].attn.num_heads,
        num_prefix_tokens=1,  # open_clip's VisionTransformer always prepends exactly one class token
        grid_size=model.grid_size,
        checkpoint_flag=(visual.transformer, "grad_checkpointing"),
    )


def multihead_self_attention(
    module: nn.MultiheadAttention,
    attend: Attend,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``nn.MultiheadAttention.forward`` for self-attention (``query is key is value``), attention through ``attend``.

    Returned weights (``need_weights``) are the probabilities before dropout, averaged over heads unless
    ``average_attn_weights`` is False.
    """
    if key is not query or value is not query:
        raise ValueError("attention taps support self-attention only (key and value must be the query tensor)")
    if key_padding_mask is not None or is_causal:
        raise ValueError("attention taps do not support key_padding_mask or is_causal in an image tower")
    x = query if module.batch_first else query.transpose(0, 1)
    batch, tokens, width = x.shape
    heads, head_dim = module.num_heads, module.head_dim
    q, k, v = F.linear(x, module.in_proj_weight, module.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(batch, tokens, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    dropout = functools.partial(F.dropout, p=module.dropout, training=module.training)
    bias = _additive_bias(attn_mask, batch, heads, q.dtype)
    out, probs = attend(ProjectedHeads(q, k, v, head_dim**-0.5, bias, dropout))
    out = F.linear(out.transpose(1, 2).reshape(batch, tokens, width), module.out_proj.weight, module.out_proj.bias)
    if not module.batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    return out, probs.mean(dim=1) if average_attn_weights else probs


def _additive_bias(attn_mask: torch.Tensor | None, batch: int, heads: int, dtype: torch.dtype) -> torch.Tensor | None:
    """nn.MultiheadAttention's ``attn_mask`` ((T, T) or (B*H, T, T); bool True = not allowed) as an additive bias."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=dtype).masked_fill_(attn_mask, float("-inf"))
    if attn_mask.ndim == 3:
        attn_mask = attn_mask.reshape(batch, heads, *attn_mask.shape[1:])
    return attn_mask.to(dtype)
