"""AttnLRP relevance (Achtibat et al., ICML 2024) for open_clip and timm ViTs, scoped to one model instance.

The rules (:mod:`robustfm.explain.lrp_rules`) are attached to *this* model's modules only, by forward hooks that wrap
each output in a routed Function, and to its attention through the attention taps' logit mask; all are removed on
exit, also after an exception. No class is patched, other instances are untouched, and the forward computes the same
outputs as without the rules. The relevance is ``z * dy/dz`` at the model's normalised input ``z`` (the output of
the wrapper's pixel normalisation), summed over channels and within each patch: the patch-grid map of paper 001
§3.2, signed (min-max it with :func:`~robustfm.explain.relevance.to_pixels` or ``normalize_maps``).

Linear layers, convolutions, additions and the pooling keep their plain gradient: the epsilon rule with epsilon -> 0,
each bias absorbing its share (the training-time choice of spec §0.2; lxt's Gamma rules for nicer heat maps are not
used). The score function itself is differentiated as is (see ``clip_class_score(cosine=False)`` for conservation).

Supported towers are the attention taps' ones built from the module types listed in :func:`_rule_types`; any other
module (a gated MLP, an attention-pooling head, RMSNorm, an in-place activation) raises ``ValueError`` naming it
rather than silently falling back to its plain gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustfm.explain.lrp_rules import RulePhase, identity_rule, layer_norm_rule, routed, routed_scale
from robustfm.explain.relevance import ScoreFn, batch_scores
from robustfm.models.attention import attention_adapter, attention_taps
from robustfm.models.clip import ClipModel
from robustfm.models.timm_classifier import TimmClassifier

# Leaf types whose plain gradient is the epsilon rule (linear in their input, or the identity in eval mode).
_LINEAR_LEAVES = (nn.Linear, nn.Conv2d, nn.Identity, nn.Dropout)
_ACTIVATIONS = (nn.GELU, nn.ReLU, nn.SiLU)


def _tower(model: nn.Module) -> nn.Module:
    if isinstance(model, ClipModel):
        return model.clip.visual
    if isinstance(model, TimmClassifier):
        return model.model
    raise ValueError(f"attnlrp needs a ClipModel or TimmClassifier with a ViT image tower, got {type(model).__name__}")


def _rule_types(model: nn.Module) -> tuple[tuple[type, ...], tuple[type, ...]]:
    """``(containers whose forward only composes supported parts (exact types), extra activation types)``."""
    if isinstance(model, ClipModel):
        from open_clip.transformer import (
            LayerScale,
            PatchDropout,
            QuickGELU,
            ResidualAttentionBlock,
            Transformer,
            VisionTransformer,
        )

        containers = (VisionTransformer, Transformer, ResidualAttentionBlock, nn.MultiheadAttention, LayerScale)
        return (*containers, PatchDropout, nn.Sequential, nn.ModuleList), (QuickGELU,)
    from timm.layers import Attention, DropPath, LayerScale, Mlp, PatchEmbed
    from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer

    containers = (VisionTransformer, Block, ResPostBlock, Attention, Mlp, PatchEmbed, LayerScale, DropPath)
    return (*containers, nn.Sequential, nn.ModuleList), ()


def _rule_modules(model: nn.Module) -> tuple[list[nn.LayerNorm], list[nn.Module]]:
    """The tower's LayerNorms and activations; ``ValueError`` naming the first module no rule covers."""
    containers, extra_activations = _rule_types(model)
    activations = (*_ACTIVATIONS, *extra_activations)
    norms, acts = [], []
    for name, module in _tower(model).named_modules():
        if isinstance(module, nn.LayerNorm):
            norms.append(module)
        elif isinstance(module, activations):
            if isinstance(module, (nn.ReLU, nn.SiLU)) and module.inplace:
                raise ValueError(f"attnlrp: {name} is an in-place {type(module).__name__} (its input is overwritten)")
            acts.append(module)
        elif not (isinstance(module, _LINEAR_LEAVES) or type(module) in containers):
            raise ValueError(
                f"attnlrp has no rule for {name or 'the tower'} ({type(module).__name__}); supported: ViT towers of "
                "LayerNorm, GELU/QuickGELU/ReLU/SiLU MLPs and the attention taps' attention"
            )
    return norms, acts


def _norm_hook(phase: RulePhase, module: nn.LayerNorm, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    rule = layer_norm_rule(len(module.normalized_shape), module.eps)
    extras = () if module.weight is None else (module.weight,)
    return routed(phase, rule, args[0], output, *extras)


def _activation_hook(phase: RulePhase, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    # The class's forward, not module(x): calling the module would run this hook again.
    fn = functools.partial(type(module).forward, module)
    return routed(phase, identity_rule(fn), args[0], output)


def _attention_hook(phase: RulePhase, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    # Uniform rule on A @ v: half the gradient to each factor. The output projection is linear, so halving the module's
    # output gradient halves the gradient of A @ v; the logit mask halves it again for q @ k^T (q, k: 1/4; v: 1/2).
    if isinstance(output, tuple):  # nn.MultiheadAttention: (output, weights)
        return (routed_scale(phase, output[0], 0.5), *output[1:])
    return routed_scale(phase, output, 0.5)


@contextmanager
def attnlrp_rules(model: nn.Module, phase: RulePhase, *, cp: bool = False) -> Iterator[None]:
    """Attach AttnLRP's rules to ``model``'s image tower for the forward passes run inside.

    Args:
        model: a ``ClipModel`` or ``TimmClassifier`` ViT.
        phase: the rules act in the backward passes run inside ``phase.routing()``; any other backward pass through
            the recorded graph sees the true derivatives.
        cp: the CP rule (Ali et al. 2022) on attention: no gradient through the probabilities ``A`` (a routed zero,
            so a second derivative still reaches ``W_q``/``W_k``), all of it to ``v``. Default: the uniform rule.
    """
    norms, acts = _rule_modules(model)
    adapter = attention_adapter(model)
    handles = []
    try:
        handles += [m.register_forward_hook(functools.partial(_norm_hook, phase)) for m in norms]
        handles += [m.register_forward_hook(functools.partial(_activation_hook, phase)) for m in acts]
        if not cp:
            handles += [
                m.register_forward_hook(functools.partial(_attention_hook, phase)) for m in adapter.attention_modules
            ]
        factor = 0.0 if cp else 0.5

        def logit_rule(block: int, logits: torch.Tensor) -> torch.Tensor:
            return routed_scale(phase, logits, factor)

        with attention_taps(model, record=False, logit_mask=logit_rule):
            yield
    finally:
        for handle in handles:
            handle.remove()


def attnlrp(
    model: nn.Module, pixels: torch.Tensor, score_fn: ScoreFn, *, create_graph: bool = False, cp: bool = False
) -> torch.Tensor:
    """AttnLRP relevance of ``score_fn`` on the patch grid ``(N, gh, gw)`` (signed; see the module docstring).

    Args:
        cp: CP rule on the attention probabilities instead of the uniform rule (:func:`attnlrp_rules`).
        create_graph: the map's parameter gradient is the exact derivative of the map (the rules act only in the
            relevance backward pass); with pixels that require grad, the map is also differentiable in them.
    """
    captured: list[torch.Tensor] = []

    def capture_input(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        if not output.requires_grad:
            output.requires_grad_(True)  # a fresh tensor (pixels without grad): the leaf the relevance is taken at
        captured.append(output)
        return output

    phase = RulePhase()
    handle = model.pixels.register_forward_hook(capture_input)
    try:
        with attnlrp_rules(model, phase, cp=cp):
            outputs = model(pixels)
    finally:
        handle.remove()
    (inputs,) = captured
    index = torch.arange(pixels.shape[0], device=pixels.device)
    score = batch_scores(score_fn, outputs, index).sum()
    with phase.routing():
        (grad,) = torch.autograd.grad(score, inputs, create_graph=create_graph)
    with torch.set_grad_enabled(create_graph):
        pixel_relevance = (inputs * grad).sum(dim=1, keepdim=True)
        gh, gw = model.grid_size
        area = pixel_relevance.shape[-2] * pixel_relevance.shape[-1] / (gh * gw)
        return F.adaptive_avg_pool2d(pixel_relevance, (gh, gw))[:, 0] * area  # the sum within each patch
