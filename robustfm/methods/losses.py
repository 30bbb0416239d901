"""CG-CLIP's two losses: the FLYP-style contrastive loss (eq. 2) and the pixel-wise corruption BCE (eq. 3).

The contrastive batch of CG-CLIP is ``[clean; corrupted]`` against object-agnostic prompts ("a clean photograph",
"a corrupt photograph"), so a batch of ``B = 2N`` pairs holds only a handful of distinct captions. With one prompt
per kind (the paper's) every caption of a kind has the same text embedding, so the duplicate logits of a row are equal
and eq. 2 read literally (the plain CLIP loss, target = the diagonal) has exactly the value and the gradients of the
multi-positive variant, which spreads each row's (and column's) target uniformly over every pair of the same caption.
They differ only when a kind has several paraphrased prompts: then plain eq. 2 pushes an image away from its own
kind's other phrasings, and multi-positive counts them as positives. With all captions distinct both are the CLIP
loss.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

ContrastiveTargets = Literal["multi_positive", "clip"]


def _check_pairs(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> None:
    if image_embeddings.ndim != 2 or image_embeddings.shape != text_embeddings.shape:
        raise ValueError(
            "contrastive loss needs one text embedding per image, both (B, E): got images "
            f"{tuple(image_embeddings.shape)} and texts {tuple(text_embeddings.shape)}"
        )


def _pair_logits(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    # logits[i, j] = s_ij / tau with s the cosine similarity; computed in float32 so AMP does not round the softmax.
    image_embeddings = F.normalize(image_embeddings.float(), dim=-1)
    text_embeddings = F.normalize(text_embeddings.float(), dim=-1)
    return logit_scale.float().reshape(()) * image_embeddings @ text_embeddings.T


def clip_contrastive_loss(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Eq. 2 as written: symmetric cross-entropy with pair ``i`` the only positive of row and column ``i``.

    Args:
        image_embeddings: ``(B, E)``, normalized here (any scale accepted).
        text_embeddings: ``(B, E)``, the caption of image ``i`` in row ``i``.
        logit_scale: the multiplier ``1 / tau`` (already exponentiated), a scalar or shape ``[1]``.
    """
    _check_pairs(image_embeddings, text_embeddings)
    logits = _pair_logits(image_embeddings, text_embeddings, logit_scale)
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def multi_positive_contrastive_loss(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    caption_ids: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """Symmetric cross-entropy where every pair with the same caption is a positive.

    Row ``i`` (image -> text) has the soft target ``P[i, j] = [c_i == c_j] / #{k : c_k == c_i}`` over the texts, and
    column ``j`` (text -> image) the same over the images; the loss is the mean of the two directions, each averaged
    over the ``B`` rows (columns), as in eq. 2. Equal to :func:`clip_contrastive_loss` when all captions differ.
    Being a cross-entropy against soft targets, its floor is the targets' entropy (``log`` of the positives' count,
    averaged), not 0: with N clean and N corrupted images and one caption each, ``log N``.

    Args:
        image_embeddings: ``(B, E)``, normalized here.
        text_embeddings: ``(B, E)``, the caption of image ``i`` in row ``i``.
        caption_ids: ``(B,)`` integers; equal ids mean the same caption.
        logit_scale: the multiplier ``1 / tau`` (already exponentiated).
    """
    _check_pairs(image_embeddings, text_embeddings)
    if caption_ids.shape != (image_embeddings.shape[0],):
        raise ValueError(f"caption_ids must have shape ({image_embeddings.shape[0]},), got {tuple(caption_ids.shape)}")
    logits = _pair_logits(image_embeddings, text_embeddings, logit_scale)
    same_caption = (caption_ids[:, None] == caption_ids[None, :]).float()
    # The relation is symmetric, so the column targets are the transpose of the row targets: both are rows of
    # same_caption divided by the size of the caption's group.
    targets = same_caption / same_caption.sum(dim=1, keepdim=True)
    image_to_text = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    text_to_image = -(targets * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


def contrastive_loss(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    caption_ids: torch.Tensor,
    logit_scale: torch.Tensor,
    targets: ContrastiveTargets = "multi_positive",
) -> torch.Tensor:
    """Dispatch on the config's ``contrastive_targets``: ``multi_positive`` (default) or ``clip`` (eq. 2 literally)."""
    if targets == "multi_positive":
        return multi_positive_contrastive_loss(image_embeddings, text_embeddings, caption_ids, logit_scale)
    if targets == "clip":
        return clip_contrastive_loss(image_embeddings, text_embeddings, logit_scale)
    raise ValueError(f"contrastive_targets must be 'multi_positive' or 'clip', got {targets!r}")


def corruption_map_loss(map_logits: torch.Tensor, target_map: torch.Tensor) -> torch.Tensor:
    """Eq. 3: mean pixel-wise binary cross-entropy between predicted logits and a ground-truth map in [0, 1].

    Args:
        map_logits: ``(N, 1, H, W)`` decoder logits (before the sigmoid).
        target_map: ``(N, 1, H, W)`` ground truth in [0, 1] (all zeros for a clean image).
    """
    if map_logits.shape != target_map.shape:
        raise ValueError(
            f"corruption map loss: logits {tuple(map_logits.shape)}, target {tuple(target_map.shape)} differ in shape"
        )
    # with_logits fuses the sigmoid into a log-sum-exp, stable for large |logit| and kept in float32 under autocast.
    return F.binary_cross_entropy_with_logits(map_logits.float(), target_map.float())
