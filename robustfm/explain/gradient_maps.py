"""Relevance from plain gradients: feature Grad-CAM on the last block's patch tokens, and input gradients.

With ``create_graph`` the forward runs inside :func:`~robustfm.models.attention.attention_taps` (no recording): the
libraries' fused attention kernels have no double backward (pytorch#116350), the taps' explicit attention does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from robustfm.explain.relevance import ScoreFn, batch_scores
from robustfm.models.attention import attention_adapter, attention_taps
from robustfm.models.clip import ClipModel
from robustfm.models.timm_classifier import TimmClassifier


@contextmanager
def second_order_forward(model: nn.Module, create_graph: bool) -> Iterator[None]:
    """Run the forward passes inside so that a double backward through them works: explicit attention for ViTs (a
    timm CNN, without tokens, needs nothing)."""
    if not create_graph or (isinstance(model, TimmClassifier) and not model.has_tokens):
        yield
        return
    with attention_taps(model, record=False):
        yield


def output_and_last_block_tokens(model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(model(pixels), the last block's first LayerNorm output (N, T, width))``, batch first, prefix included.

    That norm's output (timm ``blocks[-1].norm1``, open_clip ``resblocks[-1].ln_1``; pytorch-grad-cam's ViT target
    layer) feeds the last attention, where the patch tokens reach the class token. The last block's *output* patch
    tokens do not reach a class-token-pooled output at all: their gradient is zero.
    """
    attention_adapter(model)  # a clear error for anything but a ViT of the supported families
    if isinstance(model, ClipModel):
        transformer = model.clip.visual.transformer
        norm, batch_first = transformer.resblocks[-1].ln_1, transformer.batch_first
    else:
        norm, batch_first = model.model.blocks[-1].norm1, True
    captured: list[torch.Tensor] = []
    handle = norm.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        outputs = model(pixels)
    finally:
        handle.remove()
    return outputs, captured[0] if batch_first else captured[0].transpose(0, 1)


def gradcam(model: nn.Module, pixels: torch.Tensor, score_fn: ScoreFn, *, create_graph: bool = False) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) on the last transformer block's patch tokens ``z (N, P, C)``, taken after that
    block's first LayerNorm (:func:`output_and_last_block_tokens`): channel weights ``alpha_c = mean_p dy/dz_pc``, map
    ``relu(sum_c alpha_c z_pc)`` on the patch grid.

    ViTs only (a CNN's last stage is not implemented; the attention adapter refuses it).
    """
    index = torch.arange(pixels.shape[0], device=pixels.device)
    with second_order_forward(model, create_graph):
        outputs, block_output = output_and_last_block_tokens(model, pixels)
        score = batch_scores(score_fn, outputs, index).sum()
    (grad,) = torch.autograd.grad(score, block_output, create_graph=create_graph, retain_graph=create_graph)
    prefix = attention_adapter(model).num_prefix_tokens
    grad, tokens = grad[:, prefix:], block_output[:, prefix:]
    with torch.set_grad_enabled(create_graph):
        weights = grad.mean(dim=1, keepdim=True)
        cam = F.relu((weights * (tokens if create_graph else tokens.detach())).sum(dim=-1))
    return cam.reshape(pixels.shape[0], *model.grid_size)


def input_gradient(
    model: nn.Module,
    pixels: torch.Tensor,
    score_fn: ScoreFn,
    *,
    create_graph: bool = False,
    resolution: str = "patch",
) -> torch.Tensor:
    """``|dy/dx|`` of the score with respect to the [0, 1] pixels, summed over the RGB channels.

    Args:
        resolution: ``"patch"`` averages the pixel map within each patch, ``(N, gh, gw)``; ``"pixel"`` returns the
            pixel map ``(N, S, S)`` itself (GradMask / RRR regularise this one).
    """
    if resolution not in ("patch", "pixel"):
        raise ValueError(f"input_gradient resolution must be 'patch' or 'pixel', got {resolution!r}")
    x = pixels if pixels.requires_grad else pixels.detach().requires_grad_(True)
    index = torch.arange(pixels.shape[0], device=pixels.device)
    with second_order_forward(model, create_graph):
        score = batch_scores(score_fn, model(x), index).sum()
    (grad,) = torch.autograd.grad(score, x, create_graph=create_graph, retain_graph=create_graph)
    with torch.set_grad_enabled(create_graph):
        saliency = grad.abs().sum(dim=1)
        if resolution == "pixel":
            return saliency
        gh, gw = model.grid_size
        return F.adaptive_avg_pool2d(saliency[:, None], (gh, gw))[:, 0]
