"""CFT, concept-guided fine-tuning (paper 001 §3): the task.

A timm classifier is fine-tuned so that its relevance map Phi (min-max normalised to [0, 1]) is high on the concept
region S of each image and low elsewhere, while it keeps its own predictions::

    concept     = -(1/|S|)   sum_{p in S}     log Phi_p          (eq 3)
    non_concept = -(1/|S-bar|) sum_{p in S-bar} log(1 - Phi_p)   (eq 4)
    cls         = CE(f(x) / temperature, argmax f(x))           (eq 6)

each a mean over the batch of per-sample values, returned unweighted (the engine weights them with the stage's
``loss_weights``: :meth:`~robustfm.methods.cft_config.CFTConfig.loss_weights`). Phi is a map of the *current* model
taken with ``create_graph=True`` (:func:`robustfm.explain.relevance`), so the relevance terms train through the
gradient the map is made of. See :class:`~robustfm.methods.cft_config.CFTConfig` for the options.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robustfm.config import ConfigError, ModelConfig
from robustfm.explain.relevance import class_logit_score, normalize_maps, relevance, to_pixels
from robustfm.methods.cft_config import CFT_LOSSES, CFT_REPORTS, NORMALIZATIONS, CFTConfig
from robustfm.models.timm_classifier import TimmClassifier
from robustfm.train.task import StageSpec, stage_settings_applied

ALIGNMENT_LOSSES = frozenset({"concept", "non_concept"})
TOKEN_FREE_RELEVANCE = ("input_gradient",)
"""Relevance methods that run on a model without patch tokens (a CNN); the others read attention or tokens. (The
spec's CNN path, Grad-CAM on the last stage, is not implemented by ``robustfm.explain`` yet.)"""
LOG_FLOOR = -100.0
"""torch's ``BCELoss`` floors its logs at -100: the same floor makes ``normalize: all_pixels`` the code's loss
exactly. It is reached at the pixel where the min-max map is exactly 0 (and, in float32, where it rounds to 1)."""


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is half precision (autocast logits and maps), else unchanged (float64 tests stay)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def classifier_param_groups(model: TimmClassifier) -> dict[str, list[nn.Parameter]]:
    """``head``: the timm classifier layer (``get_classifier()``); ``backbone``: every other parameter."""
    head = list(model.model.get_classifier().parameters())
    head_ids = {id(p) for p in head}
    return {"backbone": [p for p in model.parameters() if id(p) not in head_ids], "head": head}


def check_relevance_fits(model: TimmClassifier, method: str, field: str) -> None:
    """ConfigError on ``field`` when ``method`` needs patch tokens and ``model`` (a CNN) has none."""
    if not model.has_tokens and method not in TOKEN_FREE_RELEVANCE:
        raise ConfigError(
            field,
            f"relevance {method!r} reads a ViT's attention or patch tokens, and timm/{model.arch} has none (a CNN); "
            f"methods that work on it: {list(TOKEN_FREE_RELEVANCE)}",
        )


def floored_log(x: torch.Tensor) -> torch.Tensor:
    """``max(log x, -100)`` (BCELoss's log) with a finite gradient everywhere: ``1/x`` above the floor, 0 at it.

    ``log(x).clamp(min=-100)`` would give NaN at ``x = 0`` (the clamp's zero gradient times ``1/0``), and the min-max
    map is exactly 0 at each sample's minimum. The floor is also raised to the smallest normal float, below which
    ``1/x`` overflows in float32; no gradient is lost there that the map could use (it is constant at its minimum)."""
    normal = x > max(torch.finfo(x.dtype).tiny, math.exp(LOG_FLOOR))
    logs = torch.where(normal, x, torch.ones_like(x)).log()
    return torch.where(normal, logs, torch.log(x.detach()).clamp(min=LOG_FLOOR))


@dataclass(frozen=True)
class AlignmentTerms:
    """Eqs 3-4 on one batch, and which samples each term could use."""

    concept: torch.Tensor
    """L_concept (0-dim, in the graph even when every sample dropped out)."""
    non_concept: torch.Tensor
    """L_non-concept (0-dim)."""
    empty_concept: torch.Tensor
    """``(N,)`` bool: samples whose concept region S is empty (they drop out of ``concept``)."""
    empty_non_concept: torch.Tensor
    """``(N,)`` bool: samples whose complement S-bar is empty (they drop out of ``non_concept``)."""


def alignment_losses(
    phi: torch.Tensor, region: torch.Tensor, normalize: str = "region", keep: torch.Tensor | None = None
) -> AlignmentTerms:
    """Eqs 3-4 of maps ``phi`` in [0, 1] against concept regions, both ``(N, H, W)``.

    Args:
        phi: relevance maps in [0, 1] (computed in at least float32).
        region: bool, True on the concept region S.
        normalize: ``region`` (eqs 3-4: a mean over S, resp. S-bar, per sample) or ``all_pixels`` (the code's BCE: the
            sum over the region divided by the number of pixels).
        keep: ``(N,)`` bool, samples allowed in either term (None: all); others count 0.

    Both terms are divided by the batch size N whatever drops out (a dropped sample counts 0), so that DDP's average of
    the ranks' gradients is the gradient of the whole batch's loss; the empty flags say how much dropped.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if phi.shape != region.shape or phi.ndim != 3:
        raise ValueError(f"phi and region must both be (N, H, W); got {tuple(phi.shape)} and {tuple(region.shape)}")
    inside = region.flatten(1).bool()
    outside = ~inside
    batch, pixels = inside.shape
    keep = torch.ones(batch, dtype=torch.bool, device=phi.device) if keep is None else keep.bool()
    flat = phi.flatten(1)
    terms = []
    for where, values in ((inside, -floored_log(flat)), (outside, -floored_log(1 - flat))):
        count = where.sum(dim=1)
        used = keep & (count > 0)
        sums = torch.where(where & used[:, None], values, torch.zeros_like(values)).sum(dim=1)
        per_sample = sums / (count.clamp(min=1) if normalize == "region" else pixels)
        terms.append(per_sample.sum() / batch)
    return AlignmentTerms(terms[0], terms[1], inside.sum(1) == 0, outside.sum(1) == 0)


def concept_regions(mask: torch.Tensor, resolution: str, grid: tuple[int, int]) -> torch.Tensor:
    """S(I) = mask > 0 as ``(N, H, W)`` bool: at the mask's pixels (``pixel``) or on the patch ``grid`` (``patch``),
    where a patch belongs to S when at least half of its area does."""
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim != 3:
        raise ValueError(f"batch 'mask' must be (N, 1, S, S) or (N, S, S), got shape {tuple(mask.shape)}")
    inside = mask > 0
    if resolution == "pixel":
        return inside
    return F.adaptive_avg_pool2d(inside[:, None].float(), grid)[:, 0] >= 0.5


class _ScoredLogits:
    """The relevance score (one logit per image) that also keeps the logits of the forward pass it scores, so that
    L_cls reuses the relevance method's forward instead of running another."""

    def __init__(self, labels: torch.Tensor | None) -> None:
        self.labels = labels
        self.logits: torch.Tensor | None = None

    def __call__(self, outputs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        self.logits = outputs
        classes = outputs.detach().argmax(dim=-1) if self.labels is None else self.labels.to(outputs.device)[index]
        return class_logit_score(classes)(outputs, torch.arange(outputs.shape[0], device=outputs.device))


class CFTTask(nn.Module):
    """The engine's task: ``{"concept", "non_concept", "cls"}`` losses (and the :data:`CFT_REPORTS` fractions) on
    ``{"image", "label", "mask"}`` batches.

    ``attnlrp`` runs its rules in its own forward and the cross-entropy on a second, rule-free one; the other methods
    share one forward between the map and L_cls (``rollout`` never calls the score, so it gets a second one too).

    Args:
        model: the timm classifier being fine-tuned.
        config: the method section.
    """

    def __init__(self, model: TimmClassifier, config: CFTConfig | None = None) -> None:
        super().__init__()
        self.model = model
        self.base_config = config or CFTConfig()
        check_relevance_fits(model, self.base_config.relevance, "method.relevance")
        self.config = self.base_config
        self.active_losses: frozenset[str] = frozenset(CFT_LOSSES)

    @property
    def needs(self) -> frozenset[str]:
        """``double_backward_input`` while a relevance term is active (see the registry entry), else nothing."""
        return frozenset({"double_backward_input"}) if self.active_losses & ALIGNMENT_LOSSES else frozenset()

    def configure_stage(self, stage: StageSpec) -> None:
        """Check the stage's loss weights, apply its settings (e.g. ``relevance``) and check them against the model."""
        unknown = sorted(stage.active_losses - set(CFT_LOSSES))
        if unknown:
            raise ConfigError(
                f"stages.{stage.name}.loss_weights",
                f"{unknown} cannot be weighted: the losses are {list(CFT_LOSSES)} ({list(CFT_REPORTS)} are reported)",
            )
        config = stage_settings_applied(self.base_config, stage)
        check_relevance_fits(self.model, config.relevance, f"stages.{stage.name}.settings.relevance")
        self.config = config
        self.active_losses = stage.active_losses

    def after_optimizer_step(self) -> None:
        """Nothing to do after a step."""

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """``head`` (the classifier layer) and ``backbone`` (everything else)."""
        return classifier_param_groups(self.model)

    def relevance_maps(
        self, pixels: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(maps (N, gh, gw) in the graph, the logits of the same forward or None)`` for the configured target."""
        config = self.config
        score = _ScoredLogits(labels if config.relevance_target == "label" else None)
        options = {"grad_graph": config.grad_graph} if config.relevance == "gae" else {}
        # A leaf that requires grad keeps the map differentiable when a stage freezes the whole backbone.
        pixels = pixels.detach().requires_grad_(True)
        maps = relevance(config.relevance, self.model, pixels, score, create_graph=True, **options)
        return maps, None if config.relevance == "attnlrp" else score.logits

    def alignment(self, batch: Mapping[str, torch.Tensor]) -> tuple[AlignmentTerms, torch.Tensor, torch.Tensor | None]:
        """``(eqs 3-4, the constant-map flags (N,), the logits of the relevance forward or None)``."""
        pixels, config = batch["image"], self.config
        if "mask" not in batch:
            raise KeyError("batch has no 'mask' column: CFT's relevance terms need the concept masks S(I)")
        mask = batch["mask"]
        if mask.shape[0] != pixels.shape[0] or mask.shape[-2:] != pixels.shape[-2:]:
            raise ValueError(f"batch 'mask' {tuple(mask.shape)} does not match the images {tuple(pixels.shape)}")
        labels = batch["label"] if config.relevance_target == "label" else None
        maps, logits = self.relevance_maps(pixels, labels)
        maps = at_least_float32(maps)  # the min-max and the logs: 1/Phi overflows in half precision
        if config.loss_resolution == "pixel":
            phi, constant = to_pixels(maps, tuple(pixels.shape[-2:]))
        else:
            phi, constant = normalize_maps(maps)
        region = concept_regions(mask.to(phi.device), config.loss_resolution, tuple(maps.shape[-2:]))
        # A constant map says nothing about where relevance is, and its min-max has a 1/eps gradient: it drops out.
        return alignment_losses(phi, region, config.normalize, keep=~constant), constant, logits

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unweighted losses for the active names, and the report fractions while a relevance term is active.

        Args:
            batch: ``image`` ``(N, 3, S, S)`` in [0, 1]; ``label`` ``(N,)`` class indices (needed by the ``label``
                targets); ``mask`` ``(N, 1, S, S)`` uint8, S(I) = mask > 0 (needed by the relevance terms).
        """
        losses: dict[str, torch.Tensor] = {}
        logits = None
        if self.active_losses & ALIGNMENT_LOSSES:
            terms, constant, logits = self.alignment(batch)
            for name in ("concept", "non_concept"):
                if name in self.active_losses:
                    losses[name] = getattr(terms, name)
            fractions = (terms.empty_concept, terms.empty_non_concept, constant)
            losses.update({name: f.float().mean().detach() for name, f in zip(CFT_REPORTS, fractions, strict=True)})
        if "cls" in self.active_losses:
            if logits is None:
                logits = self.model(batch["image"])
            logits = at_least_float32(logits) / self.config.temperature
            if self.config.cls_target == "label":
                target = batch["label"].to(logits.device).long()
            else:
                target = logits.detach().argmax(dim=-1)
            losses["cls"] = F.cross_entropy(logits, target)
        return losses


def build_cft_task(model: ModelConfig, settings: CFTConfig) -> CFTTask:
    """Build the timm classifier named by ``model`` (random init, a tag or a local path) as a CFT task.

    A CNN with a relevance method that needs tokens fails here, naming ``method.relevance`` and the methods that work.
    """
    from robustfm.models import create_model

    classifier = create_model(model.name, pretrained=model.pretrained)
    if not isinstance(classifier, TimmClassifier):
        raise ConfigError("model.name", f"cft fine-tunes a timm classifier (timm/...); {model.name} is not one")
    return CFTTask(classifier, settings)
