"""Relevance from attention probabilities: GAE (the CFT code's map), rollout and attention Grad-CAM.

All three read the per-block post-softmax probabilities ``A (N, H, T, T)`` (rows: queries) from
:func:`~robustfm.models.attention.attention_taps` and return the class-token row over the patch tokens, ``(N, gh,
gw)``. The class token is token 0 in both libraries (timm puts register tokens after it); every prefix column is
dropped from the map.
"""

from __future__ import annotations

import torch
from torch import nn

from robustfm.explain.relevance import ScoreFn, batch_scores, class_row_map
from robustfm.models.attention import attention_taps


def _scored_forward(model: nn.Module, pixels: torch.Tensor, score_fn: ScoreFn) -> torch.Tensor:
    index = torch.arange(pixels.shape[0], device=pixels.device)
    return batch_scores(score_fn, model(pixels), index).sum()  # samples are independent: one backward for all


def gae(
    model: nn.Module, pixels: torch.Tensor, score_fn: ScoreFn, *, create_graph: bool = False, grad_graph: bool = False
) -> torch.Tensor:
    """Chefer et al. ICCV'21 generic attention explainability, as the CFT code computes it (``explanations.py::lrp``).

    ``R = I``; for each block ``R = R + mean_heads(clamp(dy/dA * A, min=0)) @ R``; the map is ``R``'s class-token row
    over the patches.

    Args:
        grad_graph: with ``create_graph``, whether ``dy/dA`` is itself differentiated. False (the CFT code, which calls
            ``autograd.grad`` without ``create_graph``) treats the gradient as a constant, so training flows through
            ``A`` only; True gives the full second-order derivative of the map.
    """
    with attention_taps(model, keep_graph=True) as taps:
        score = _scored_forward(model, pixels, score_fn)
        probs = taps.probs
    grads = torch.autograd.grad(score, probs, create_graph=create_graph and grad_graph, retain_graph=create_graph)
    with torch.set_grad_enabled(create_graph):
        if not create_graph:
            probs = [p.detach() for p in probs]
        batch, _, tokens, _ = probs[0].shape
        eye = torch.eye(tokens, dtype=probs[0].dtype, device=probs[0].device)
        rollout = eye.expand(batch, tokens, tokens)
        for attention, grad in zip(probs, grads, strict=True):
            cam = (grad * attention).clamp(min=0).mean(dim=1)  # clamp before the head mean, as the code does
            rollout = rollout + cam @ rollout
    return class_row_map(rollout[:, 0], taps.num_prefix_tokens, taps.grid_size)


def rollout(
    model: nn.Module, pixels: torch.Tensor, score_fn: ScoreFn, *, create_graph: bool = False, residual: float = 0.5
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, ACL 2020): ``R = prod_blocks normalize(residual * I + (1 - residual) *
    mean_heads(A))``, last block leftmost; the map is ``R``'s class-token row over the patches. Target independent:
    ``score_fn`` is not called."""
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"rollout residual must be in [0, 1], got {residual}")
    with attention_taps(model, keep_graph=create_graph) as taps, torch.set_grad_enabled(create_graph):
        model(pixels)
        result = None
        for attention in taps.probs:
            eye = torch.eye(attention.shape[-1], dtype=attention.dtype, device=attention.device)
            mixed = residual * eye + (1.0 - residual) * attention.mean(dim=1)
            mixed = mixed / mixed.sum(dim=-1, keepdim=True)
            result = mixed if result is None else mixed @ result
    return class_row_map(result[:, 0], taps.num_prefix_tokens, taps.grid_size)


def attn_gradcam(
    model: nn.Module, pixels: torch.Tensor, score_fn: ScoreFn, *, create_graph: bool = False
) -> torch.Tensor:
    """Grad-CAM on the last block's attention (Chefer et al. CVPR'21 baseline, ``generate_attn_gradcam``).

    Each head's weight is its gradient ``dy/dA`` averaged over the class-token row's patch columns; the map is
    ``clamp(mean_heads(weight_h * A_h[cls, patches]), min=0)``.
    """
    with attention_taps(model, keep_graph=True) as taps:
        score = _scored_forward(model, pixels, score_fn)
        last = taps.probs[-1]
    (grad,) = torch.autograd.grad(score, last, create_graph=create_graph, retain_graph=create_graph)
    prefix = taps.num_prefix_tokens
    with torch.set_grad_enabled(create_graph):
        attention = last[:, :, 0] if create_graph else last[:, :, 0].detach()  # (N, H, T): class-token rows
        weights = grad[:, :, 0, prefix:].mean(dim=-1, keepdim=True)
        cam = (weights * attention).mean(dim=1).clamp(min=0)
    return class_row_map(cam, prefix, taps.grid_size)
