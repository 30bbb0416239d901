"""CCI: cluster-masked attention attribution of a ViT (paper 002 §3).

For each image: K-means clusters its patch tokens; for each cluster ``k`` the model runs again with the attention
logits of that cluster's *key* patches set to ``-inf`` in every block and head (every query row; class and register
tokens never masked), through the attention taps' logit mask. With ``s`` the clean score and ``s_k`` the score without
cluster ``k``::

    delta_k = s - s_k,    w_k = delta_k / sum_j delta_j,    map = sum_k w_k * mask_k   (on the patch grid)

The K masked passes and the clean pass of every image run as one batch of rows (chunked by ``batch_size``); each row
has its own mask, so results do not depend on which images share a batch. Clustering is seeded per image.

Spec §1.4 choices: ``cluster_on="final"`` (last block's patch tokens, before the final norm; paper's Preliminaries),
``"final_norm"`` (after it) or ``"input"`` (the first block's input, the unofficial reimplementation's ``ln_pre``
output); ``negative="keep"`` (paper: a cluster whose removal raises the score gets a negative weight) or ``"clip"``
(``delta_k`` clipped at 0); ``|sum_j delta_j| < 1e-8`` gives a zero map, flagged ``degenerate``; a cluster K-means
left empty gets weight 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from robustfm.explain.relevance import ScoreFn, batch_scores, check_pixels, resolve_score
from robustfm.models.attention import attention_adapter, attention_taps, key_mask_from_patch_groups
from robustfm.models.clip import ClipModel

#: |sum_k delta_k| below this: the clusters explain nothing, the map is zero (spec §1.4).
DEGENERATE_TOTAL = 1e-8
CLUSTER_FEATURES = ("final", "final_norm", "input")


class CCIResult(NamedTuple):
    """What :func:`cci` returns.

    Attributes:
        weights: ``(N, K)`` cluster weights ``w_k``; they sum to 1 per image unless degenerate (then all 0).
        labels: ``(N, gh * gw)`` long, each patch's cluster in row-major grid order.
        map: ``(N, gh, gw)``, ``map[p] = w[labels[p]]``.
        degenerate: ``(N,)`` bool, images whose ``|sum_k delta_k| < 1e-8`` (zero map).
        scores: ``(N, K + 1)``: the clean score, then the score with each cluster masked.
    """

    weights: torch.Tensor
    labels: torch.Tensor
    map: torch.Tensor
    degenerate: torch.Tensor
    scores: torch.Tensor


def cci(
    model: nn.Module,
    pixels: torch.Tensor,
    score_fn: torch.Tensor | ScoreFn,
    *,
    seeds: Sequence[int],
    k: int = 7,
    cluster_on: str = "final",
    negative: str = "keep",
    n_init: int = 10,
    batch_size: int = 64,
) -> CCIResult:
    """CCI maps of a batch.

    Args:
        model: a ``ClipModel`` or ``TimmClassifier`` ViT (the attention taps' models), used as is (eval mode for
            deterministic maps).
        pixels: ``(N, 3, S, S)`` in [0, 1].
        score_fn: a :data:`~robustfm.explain.relevance.ScoreFn` (CLIP: ``clip_class_score(text, classes)``, the cosine
            of paper 002), or ``(N,)`` class indices for a classifier (the target logit).
        seeds: one integer per image: sklearn ``KMeans(random_state=seed)``; derive it from the image's identity, not
            its position in the batch, for maps that do not depend on batching.
        k: clusters per image (paper: 7); at most the number of patches.
        cluster_on: ``"final"``, ``"final_norm"`` or ``"input"`` (module docstring).
        negative: ``"keep"`` or ``"clip"`` (module docstring).
        n_init: K-means restarts (sklearn's ``n_init``).
        batch_size: rows (images x (K + 1) passes) per forward.
    """
    check_pixels(pixels, "cci", needs_grad=False)  # no autograd: inference mode is fine
    adapter = attention_adapter(model)
    num_patches = adapter.grid_size[0] * adapter.grid_size[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_patches:
        raise ValueError(f"cci k must be an integer in 1..{num_patches} (the patches of one image), got {k!r}")
    if cluster_on not in CLUSTER_FEATURES:
        raise ValueError(f"cci cluster_on must be one of {CLUSTER_FEATURES}, got {cluster_on!r}")
    seeds = [int(seed) for seed in seeds]
    if len(seeds) != pixels.shape[0]:
        raise ValueError(f"cci seeds: need one per image ({pixels.shape[0]}), got {len(seeds)}")
    score_fn = resolve_score(model, score_fn, pixels.shape[0])
    with torch.no_grad():
        features = patch_features(model, pixels, cluster_on)
    labels = torch.stack([cluster_patches(f, k, seed, n_init) for f, seed in zip(features, seeds, strict=True)])
    return cluster_attribution(
        model, pixels, labels.to(pixels.device), score_fn, k=k, negative=negative, batch_size=batch_size
    )


def patch_features(model: nn.Module, pixels: torch.Tensor, cluster_on: str = "final") -> torch.Tensor:
    """The patch tokens K-means clusters, ``(N, gh * gw, width)``, in row-major grid order."""
    last = model.num_blocks
    if cluster_on in ("final", "final_norm"):
        _, tokens = model.encode_image_with_tokens(pixels, blocks=[last])
        tokens = tokens[last]
        if cluster_on == "final_norm":
            tokens = model.clip.visual.ln_post(tokens) if isinstance(model, ClipModel) else model.model.norm(tokens)
        return tokens
    # The first block's input: open_clip's ln_pre output, timm's norm_pre output (after the position embedding).
    stem = model.clip.visual.ln_pre if isinstance(model, ClipModel) else model.model.norm_pre
    captured: list[torch.Tensor] = []
    handle = stem.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        model(pixels)
    finally:
        handle.remove()
    adapter = attention_adapter(model)
    tokens = captured[0]
    expected = (pixels.shape[0], adapter.num_prefix_tokens + adapter.grid_size[0] * adapter.grid_size[1])
    if tuple(tokens.shape[:2]) != expected:
        raise RuntimeError(
            f"{adapter.name}: block-1 input has shape {tuple(tokens.shape)}, expected {expected} + width"
        )
    return tokens[:, adapter.num_prefix_tokens :]


def cluster_patches(features: torch.Tensor, k: int, seed: int, n_init: int = 10) -> torch.Tensor:
    """K-means labels ``(P,)`` of one image's patch features ``(P, C)`` (sklearn, float64, ``random_state=seed``;
    any integer seed, e.g. a 64-bit :func:`robustfm.seeding.sample_seed`, is folded into sklearn's 32-bit range)."""
    from sklearn.cluster import KMeans

    points = features.detach().to("cpu", torch.float64).numpy()
    labels = KMeans(n_clusters=k, n_init=n_init, random_state=int(seed) % 2**32).fit_predict(points)
    return torch.from_numpy(labels).long()


def cluster_attribution(
    model: nn.Module,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    score_fn: ScoreFn,
    *,
    k: int,
    negative: str = "keep",
    batch_size: int = 64,
) -> CCIResult:
    """CCI weights and maps of given patch clusters ``labels (N, gh * gw)`` with values in ``0..k-1``."""
    if negative not in ("keep", "clip"):
        raise ValueError(f"cci negative must be 'keep' (paper) or 'clip', got {negative!r}")
    if batch_size < 1:
        raise ValueError(f"cci batch_size must be >= 1, got {batch_size}")
    adapter = attention_adapter(model)
    batch, num_patches = labels.shape
    if batch != pixels.shape[0] or num_patches != adapter.grid_size[0] * adapter.grid_size[1]:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match {batch} images of {num_patches} patches")
    scores = _masked_scores(model, pixels, labels, score_fn, k, adapter.num_prefix_tokens, batch_size)
    present = torch.nn.functional.one_hot(labels, k).any(dim=1)  # (N, K)
    delta = torch.where(present, scores[:, :1] - scores[:, 1:], torch.zeros_like(scores[:, 1:]))
    if negative == "clip":
        delta = delta.clamp(min=0)
    total = delta.sum(dim=1, keepdim=True)
    degenerate = total.abs() < DEGENERATE_TOTAL
    weights = torch.where(degenerate, torch.zeros_like(delta), delta / torch.where(degenerate, 1.0, total))
    maps = weights.gather(1, labels).reshape(batch, *adapter.grid_size)
    return CCIResult(weights.float(), labels, maps.float(), degenerate.flatten(), scores.float())


def _masked_scores(
    model: nn.Module,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    score_fn: ScoreFn,
    k: int,
    num_prefix_tokens: int,
    batch_size: int,
) -> torch.Tensor:
    """``(N, K + 1)`` scores: the clean pass (drop label -1, which matches no patch), then each cluster dropped."""
    batch = pixels.shape[0]
    image = torch.arange(batch, device=pixels.device).repeat_interleave(k + 1)
    dropped = torch.arange(-1, k, device=pixels.device).repeat(batch)
    scores = []
    with torch.no_grad(), attention_taps(model, record=False) as taps:
        for start in range(0, image.numel(), batch_size):
            rows = image[start : start + batch_size]
            taps.logit_mask = key_mask_from_patch_groups(
                labels[rows], dropped[start : start + batch_size], num_prefix_tokens, dtype=pixels.dtype
            )
            # float64 from here: the weights divide differences of nearby scores by their sum
            scores.append(batch_scores(score_fn, model(pixels[rows]), rows).double())
    return torch.cat(scores).reshape(batch, k + 1)
