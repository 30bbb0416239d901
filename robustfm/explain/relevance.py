"""Relevance maps of ViTs: one registry, one call, scores that say what is explained, and the map post-processing.

::

    maps = relevance("gae", model, pixels, labels)  # TimmClassifier: explain the labels' logits -> (N, gh, gw)
    score = clip_class_score(text_embeddings, labels)  # ClipModel: cosine with each image's class text embedding
    maps = relevance("attnlrp", clip, pixels, score, create_graph=True)  # CFT trains through the map
    phi, constant = to_pixels(maps, 224)  # bilinear, per-sample min-max in [0, 1]

Every method runs its own forward pass of ``model`` on ``pixels`` (float [0, 1], ``(N, 3, S, S)``) and returns a
patch-grid map ``(N, gh, gw)`` (``input_gradient`` can return pixels). With ``create_graph=True`` the map stays in the
autograd graph, so a loss on it gives parameter gradients (the forward runs inside
:func:`~robustfm.models.attention.attention_taps`, whose explicit attention has a double backward); otherwise it is
detached. Gradients are enabled inside (callers may be under ``torch.no_grad()``), but ``torch.inference_mode()`` and
inference tensors cannot take part in autograd and are refused (spec §0.5).

Entries of :data:`RELEVANCE` (meta ``uses_score``: whether the target matters; ``description``):
``gae``, ``rollout``, ``attn_gradcam`` (:mod:`robustfm.explain.attention_maps`), ``gradcam``, ``input_gradient``
(:mod:`robustfm.explain.gradient_maps`), ``attnlrp`` (:mod:`robustfm.explain.attnlrp`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustfm.registry import Registry

#: ``score_fn(outputs, index) -> (M,)``: one score per row of the model's outputs (``ClipModel``: image embeddings
#: ``(M, embed_dim)``, not normalised; ``TimmClassifier``: logits ``(M, num_classes)``), where ``index (M,)`` gives the
#: position of each row's image in the caller's batch (rows of CCI's masked passes repeat their image's index).
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: A relevance method: ``fn(model, pixels, score_fn, *, create_graph, **options) -> (N, gh, gw)``.
RelevanceFn = Callable[..., torch.Tensor]

RELEVANCE: Registry[RelevanceFn] = Registry("relevance method")
RELEVANCE.register_lazy(
    "gae",
    "robustfm.explain.attention_maps:gae",
    uses_score=True,
    description="Chefer et al. ICCV'21 gradient-weighted rollout (the CFT code's 'lrp'): R = I; per block "
    "R += mean_heads(clamp(dy/dA * A, 0)) @ R; class-token row over the patches",
)
RELEVANCE.register_lazy(
    "rollout",
    "robustfm.explain.attention_maps:rollout",
    uses_score=False,
    description="Abnar & Zuidema 2020: product over blocks of row-normalised 0.5 * mean_heads(A) + 0.5 * I",
)
RELEVANCE.register_lazy(
    "attn_gradcam",
    "robustfm.explain.attention_maps:attn_gradcam",
    uses_score=True,
    description="Grad-CAM on the last block's class-token attention (Chefer et al. CVPR'21 baseline)",
)
RELEVANCE.register_lazy(
    "gradcam",
    "robustfm.explain.gradient_maps:gradcam",
    uses_score=True,
    description="Grad-CAM on the last block's patch tokens: relu(sum_c mean_p(dy/dz_pc) * z_pc)",
)
RELEVANCE.register_lazy(
    "input_gradient",
    "robustfm.explain.gradient_maps:input_gradient",
    uses_score=True,
    description="|dy/dx| summed over the RGB channels, averaged within each patch (or at pixel level)",
)
RELEVANCE.register_lazy(
    "attnlrp",
    "robustfm.explain.attnlrp:attnlrp",
    uses_score=True,
    description="AttnLRP (Achtibat et al. ICML'24) input * gradient with routed rules, summed within each patch",
)


def class_logit_score(classes: torch.Tensor) -> ScoreFn:
    """The logit of each image's class: ``outputs[m, classes[index[m]]]`` (classifiers; CCI's classifier score)."""
    classes = _check_classes(classes)

    def score(outputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(outputs.shape[0], device=outputs.device)
        return outputs[rows, classes.to(outputs.device)[index]]

    return score


def clip_class_score(text_embeddings: torch.Tensor, classes: torch.Tensor, *, cosine: bool = True) -> ScoreFn:
    """CLIP's score of each image for its class: ``<e / |e|, t_c / |t_c|>`` (cosine, CCI's ``s``, paper 002 §3).

    Args:
        text_embeddings: ``(C, embed_dim)`` class text embeddings (e.g. the zero-shot classifier's), any norm.
        classes: ``(N,)`` the class of each image of the batch.
        cosine: False gives ``<e, t_c / |t_c|>``, linear in the image embedding. Input-times-gradient relevance
            (``attnlrp``) conserves the score only for a linear one: a cosine is scale invariant, its gradient is
            orthogonal to ``e`` and its relevance at the embedding sums to zero.
    """
    if text_embeddings.ndim != 2:
        raise ValueError(f"text_embeddings must be (num_classes, embed_dim), got shape {tuple(text_embeddings.shape)}")
    classes = _check_classes(classes)
    if classes.numel() and int(classes.max()) >= text_embeddings.shape[0]:
        raise ValueError(f"class {int(classes.max())} has no text embedding ({text_embeddings.shape[0]} given)")
    text = F.normalize(text_embeddings.detach().float(), dim=-1)

    def score(outputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        image = F.normalize(outputs, dim=-1) if cosine else outputs
        return (image * text.to(outputs.device, outputs.dtype)[classes.to(outputs.device)[index]]).sum(-1)

    return score


def _check_classes(classes: torch.Tensor) -> torch.Tensor:
    if not isinstance(classes, torch.Tensor) or classes.ndim != 1 or classes.is_floating_point():
        raise ValueError(f"target classes must be an integer tensor (N,), got {classes!r:.80}")
    if classes.numel() and int(classes.min()) < 0:
        raise ValueError(f"target classes must be >= 0, got {int(classes.min())}")
    return classes.long()


def resolve_score(model: nn.Module, target: torch.Tensor | ScoreFn, batch: int) -> ScoreFn:
    """A :data:`ScoreFn` from class indices (classifiers) or a score callable (any model)."""
    if callable(target) and not isinstance(target, torch.Tensor):
        return target
    from robustfm.models.clip import ClipModel

    if isinstance(model, ClipModel):
        raise ValueError(
            "target: a ClipModel outputs image embeddings, not class logits; pass a score callable, e.g. "
            "clip_class_score(text_embeddings, classes)"
        )
    classes = _check_classes(target)
    if classes.shape[0] != batch:
        raise ValueError(f"target has {classes.shape[0]} classes for {batch} images")
    return class_logit_score(classes)


def batch_scores(score_fn: ScoreFn, outputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``score_fn(outputs, index)``, checked to give one score per row."""
    scores = score_fn(outputs, index)
    if not isinstance(scores, torch.Tensor) or scores.shape != (outputs.shape[0],):
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"score_fn must return one score per row, shape ({outputs.shape[0]},); got {got}")
    return scores


def check_pixels(pixels: torch.Tensor, what: str = "relevance", needs_grad: bool = True) -> None:
    """Refuse non-float or mis-shaped batches, and (``needs_grad``) what autograd cannot use: inference mode and
    inference tensors (spec §0.5: the evaluation actors run under ``torch.inference_mode()``)."""
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or not pixels.is_floating_point():
        raise ValueError(f"{what}: pixels must be a float tensor (N, 3, S, S) in [0, 1], got {pixels!r:.80}")
    if not needs_grad:
        return
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{what} needs autograd but runs under torch.inference_mode(); use torch.no_grad() or nothing instead"
        )
    if pixels.is_inference():
        raise RuntimeError(
            f"{what}: pixels is an inference tensor (created under torch.inference_mode()) and cannot take part in "
            "autograd; create it outside inference mode, or clone it there first"
        )


def relevance(
    name: str,
    model: nn.Module,
    pixels: torch.Tensor,
    target: torch.Tensor | ScoreFn,
    *,
    create_graph: bool = False,
    **options: Any,
) -> torch.Tensor:
    """The relevance map of ``model`` on ``pixels`` for ``target`` by the registered method ``name``.

    Args:
        name: a :data:`RELEVANCE` entry; unknown names raise with a "did you mean".
        model: a ``ClipModel`` or ``TimmClassifier`` with a ViT image tower (the attention taps' models); its
            train/eval mode is left as is.
        pixels: ``(N, 3, S, S)`` float pixels in [0, 1].
        target: ``(N,)`` class indices (classifiers: their logits are explained) or a :data:`ScoreFn`
            (:func:`clip_class_score` for CLIP). Ignored by ``rollout``.
        create_graph: keep the map in the graph (training through it) instead of returning it detached.
        options: method options (``gae``: ``grad_graph``; ``attnlrp``: ``cp``; ``input_gradient``: ``resolution``).

    Returns:
        ``(N, gh, gw)`` on the model's patch grid (``input_gradient`` with ``resolution="pixel"``: ``(N, S, S)``).
    """
    method = RELEVANCE.get(name)
    check_pixels(pixels)
    score_fn = resolve_score(model, target, pixels.shape[0])
    if not create_graph and not pixels.requires_grad:
        # A frozen model (an evaluation actor's) has no parameter that requires grad: without this leaf the
        # attention maps and activations the methods differentiate would not be in any graph.
        pixels = pixels.detach().requires_grad_(True)
    with torch.enable_grad():
        maps = method(model, pixels, score_fn, create_graph=create_graph, **options)
    if maps.ndim != 3 or maps.shape[0] != pixels.shape[0]:
        raise RuntimeError(f"relevance method {name!r} returned shape {tuple(maps.shape)}, expected (N, gh, gw)")
    return maps if create_graph else maps.detach()


def normalize_maps(maps: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample min-max to [0, 1]: ``(m - min) / (max - min + eps)`` (differentiable).

    The epsilon keeps a constant map finite (the CFT code divides by ``max - min`` alone, NaN on a constant map):
    such a map becomes all zeros.

    Returns:
        ``(maps in [0, 1] with the input's shape, constant (N,) bool: samples whose range was <= eps)``.
    """
    flat = maps.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    out = (flat - low) / (span + eps)
    return out.reshape(maps.shape), (span <= eps).flatten()


def to_pixels(maps: torch.Tensor, size: int | Sequence[int], eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinearly upsample patch-grid maps ``(N, gh, gw)`` to ``size`` then min-max each to [0, 1].

    Returns:
        ``(maps (N, H, W) in [0, 1], constant (N,) bool)``; a constant map (range <= eps) is all zeros there.
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must be (N, gh, gw), got shape {tuple(maps.shape)}")
    out_size = (size, size) if isinstance(size, int) else tuple(size)
    # align_corners=False: the CFT code's (and F.interpolate's) convention, patch centres at (i + 0.5) * patch.
    up = maps[:, None].float() if maps.dtype in (torch.float16, torch.bfloat16) else maps[:, None]
    up = F.interpolate(up, size=out_size, mode="bilinear", align_corners=False)[:, 0]
    return normalize_maps(up, eps)


def class_row_map(rows: torch.Tensor, num_prefix_tokens: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """The class-token row ``(N, T)`` (row 0 of a token-by-token matrix) over the patch columns, as ``(N, gh, gw)``."""
    return rows[:, num_prefix_tokens:].reshape(rows.shape[0], *grid_size)
