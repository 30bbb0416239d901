"""Attack objectives: per-sample losses to MAXIMIZE, and where it makes sense, per-sample success.

The registry (:data:`robustfm.attacks.OBJECTIVES`) points at the constants at the bottom of this module, lazily.

An :class:`Objective` sees the model's outputs at the attacked points and a ``target`` mapping of tensors whose first
dim is the batch (labels, precomputed embeddings). It never calls the model itself: the attack owns the forward pass
(eval mode, autocast, gradient w.r.t. the input only). Because every target is per row, a row's loss depends on that
row alone, so a batch is attacked exactly as its rows would be one by one.

Losses are computed in fp32 (the attack casts the outputs) and reduced per row: the attack backpropagates their sum,
which gives each row its own gradient whatever the batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Target = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Objective:
    """A loss to maximize over the perturbation.

    Attributes:
        name: the registry name.
        loss: ``(outputs, target) -> (B,)`` loss per row; higher is a stronger attack.
        needs: keys of ``target`` that ``loss`` (and ``success``) read; each a tensor with the batch as first dim.
        success: ``(outputs, target) -> (B,)`` bool, whether the row is fooled; None when the objective has no
            notion of success (embedding attacks): the attack then only tracks the best loss.
    """

    name: str
    loss: Callable[[torch.Tensor, Target], torch.Tensor]
    needs: tuple[str, ...]
    success: Callable[[torch.Tensor, Target], torch.Tensor] | None = None

    def check_target(self, target: Target, batch: int) -> None:
        """Raise ``ValueError`` naming the key if ``target`` lacks a needed tensor or its first dim isn't ``batch``."""
        for key in self.needs:
            if key not in target:
                raise ValueError(f"objective {self.name!r} needs target[{key!r}]; got keys {sorted(target)}")
            value = target[key]
            if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] != batch:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(
                    f"objective {self.name!r}: target[{key!r}] must be a tensor with the batch ({batch}) as its "
                    f"first dim, got {shape}"
                )


def _ce_loss(logits: torch.Tensor, target: Target) -> torch.Tensor:
    return F.cross_entropy(logits, target["labels"].long(), reduction="none")


def _ce_success(logits: torch.Tensor, target: Target) -> torch.Tensor:
    return logits.argmax(dim=1) != target["labels"].long()


def _embedding_l2(embeddings: torch.Tensor, target: Target) -> torch.Tensor:
    # FARE (RobustVLM `l2`): mse_loss(reduction='none').sum(1), unnormalized; the batch mean is the trainer's business.
    return (embeddings - target["target"].to(embeddings.dtype)).pow(2).sum(dim=1)


def _dlr_targeted_loss(logits: torch.Tensor, target: Target) -> torch.Tensor:
    # Croce & Hein's targeted DLR (auto-attack APGD-T): -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2); shift- and
    # scale-invariant in the logits, so the logit scale cannot mask the attack. Needs >= 4 classes.
    if logits.shape[1] < 4:
        raise ValueError(f"objective 'dlr_targeted' needs logits of at least 4 classes, got {logits.shape[1]}")
    ordered = logits.sort(dim=1).values
    rows = torch.arange(logits.shape[0], device=logits.device)
    true, wanted = logits[rows, target["labels"].long()], logits[rows, target["target_labels"].long()]
    return -(true - wanted) / (ordered[:, -1] - 0.5 * (ordered[:, -3] + ordered[:, -4]) + 1e-12)


def _two_afc_logits(reference: torch.Tensor, target: Target) -> torch.Tensor:
    left = F.cosine_similarity(reference, target["left"].to(reference.dtype), dim=1)
    right = F.cosine_similarity(reference, target["right"].to(reference.dtype), dim=1)
    return torch.stack((left, right), dim=1)  # unscaled cosines, as perceptual-metrics attacks them


def _two_afc_loss(reference: torch.Tensor, target: Target) -> torch.Tensor:
    return F.cross_entropy(_two_afc_logits(reference, target), target["labels"].long(), reduction="none")


def _two_afc_success(reference: torch.Tensor, target: Target) -> torch.Tensor:
    logits = _two_afc_logits(reference, target)
    decision = (logits[:, 1] > logits[:, 0]).long()  # tie -> left (perceptual-metrics)
    return decision != target["labels"].long()


def _unit_distance_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||n(a) - n(b)||^2 over the last dim (broadcasting), n = L2 normalization."""
    return (F.normalize(a, dim=-1) - F.normalize(b.to(a.dtype), dim=-1)).pow(2).sum(dim=-1)


def _cosine_away(embeddings: torch.Tensor, target: Target) -> torch.Tensor:
    return _unit_distance_sq(embeddings, target["clean"])  # eq. 6, maximized


def _targeted_set(embeddings: torch.Tensor, target: Target) -> torch.Tensor:
    targets = target["targets"]
    if targets.ndim != 3:
        raise ValueError(f"objective 'targeted_set': target['targets'] must be (B, K, D), got {tuple(targets.shape)}")
    return -_unit_distance_sq(embeddings.unsqueeze(1), targets).sum(dim=1)  # eq. 5 is a minimization


def _inversion(embeddings: torch.Tensor, target: Target) -> torch.Tensor:
    return -_unit_distance_sq(embeddings, target["target"])  # eq. 9 is a minimization


CE = Objective("ce", _ce_loss, ("labels",), _ce_success)
DLR_TARGETED = Objective("dlr_targeted", _dlr_targeted_loss, ("labels", "target_labels"), _ce_success)
EMBEDDING_L2 = Objective("embedding_l2", _embedding_l2, ("target",))
TWO_AFC = Objective("two_afc", _two_afc_loss, ("left", "right", "labels"), _two_afc_success)
COSINE_AWAY = Objective("cosine_away", _cosine_away, ("clean",))
TARGETED_SET = Objective("targeted_set", _targeted_set, ("targets",))
INVERSION = Objective("inversion", _inversion, ("target",))
