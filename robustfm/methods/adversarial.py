"""What FARE and TeCoA share: the inner maximizers and the task around them.

A maximizer turns clean [0,1] images into the points the loss is taken at, with the model held in eval mode and
gradients taken w.r.t. the input only (the parameters' ``.grad`` stay untouched, so nothing leaks into the optimizer
step); the task then runs its training forward on those points in train mode (RobustVLM: ``model.eval()`` for the
attack, ``model.train()`` for the update). Every maximizer has the signature of :data:`Maximizer`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from robustfm.config import ConfigError
from robustfm.methods.adversarial_config import MAXIMIZERS, AdversarialFTConfig
from robustfm.models.clip import ClipModel
from robustfm.seeding import sample_seed
from robustfm.train.task import StageSpec, stage_settings_applied

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class InnerProblem:
    """One inner maximization: what a :data:`Maximizer` is given.

    Attributes:
        forward: maps [0,1] pixels to what the attack objective reads.
        x: the clean images (B, 3, H, W) in [0, 1].
        target: the objective's tensors (e.g. FARE's ``target`` embeddings, TeCoA's ``labels``).
        config: the method config (its ``attack``, ``perturbations``, ``values_per_perturbation``).
        row_seeds: one int per row (None: seeded by the attack's config).
        model: held in eval mode while the maximizer runs.
    """

    forward: Forward
    x: torch.Tensor
    target: Mapping[str, torch.Tensor]
    config: AdversarialFTConfig
    row_seeds: Sequence[int] | None
    model: nn.Module


Maximizer = Callable[[InnerProblem], torch.Tensor]
"""``maximize(problem) -> points``: the points (same shape as ``problem.x``) the loss is taken at."""

ATTACK_SEED = "attack_seed"
"""The batch column of per-image attack seeds (from (id, epoch): :class:`robustfm.recipes.adversarial.AttackSeeds`)."""


def pgd_points(problem: InnerProblem) -> torch.Tensor:
    """RobustVLM's training attack: PGD with momentum, the last iterate (no extra scoring forward)."""
    from robustfm.attacks import pgd

    p = problem
    attack = p.config.attack
    return pgd(p.forward, p.x, p.target, attack, row_seeds=p.row_seeds, eval_modules=p.model, score_last=False).x_adv


def apgd_points(problem: InnerProblem) -> torch.Tensor:
    """APGD's highest-loss points (not RobustVLM's ``apgd_train``, which returns the clean image where nothing
    "flipped": meaningless for an embedding loss, see the spec)."""
    from robustfm.attacks import apgd

    p = problem
    return apgd(p.forward, p.x, p.target, p.config.attack, row_seeds=p.row_seeds, eval_modules=p.model).x_adv


def worst_perturbation(problem: InnerProblem) -> torch.Tensor:
    """Per image, the edit of ``config.perturbations`` x ``values_per_perturbation`` with the highest objective
    (forward passes only, under no_grad); random edits (noise) draw from per-image generators seeded by
    ``row_seeds``. The edit's value grid replaces the eps-ball: these points are not within ``attack.eps``."""
    from robustfm.attacks import OBJECTIVES
    from robustfm.attacks.common import held_in_eval, model_precision
    from robustfm.perturbations import PERTURBATIONS, perturb, sweep

    forward, target, config, model = problem.forward, problem.target, problem.config, problem.model
    objective = OBJECTIVES.get(config.attack.objective)
    objective.check_target(target, problem.x.shape[0])
    seeds = list(problem.row_seeds) if problem.row_seeds is not None else list(range(problem.x.shape[0]))
    names = config.perturbations if config.perturbations is not None else tuple(PERTURBATIONS.names())
    x = problem.x.detach().float()
    best, best_loss = x.clone(), torch.full((x.shape[0],), float("-inf"), device=x.device)
    with torch.no_grad(), held_in_eval([model]):
        for name in names:
            for step, value in enumerate(sweep(name, config.values_per_perturbation)):
                generators = [
                    torch.Generator().manual_seed(sample_seed(int(s), step, f"worst_edit/{name}", config.attack.seed))
                    for s in seeds
                ]
                edited = perturb(x, name, value, generators)
                with model_precision(config.attack, x.device):
                    outputs = forward(edited)
                loss = objective.loss(outputs.float(), target)
                loss = torch.where(torch.isfinite(loss), loss, torch.full_like(loss, float("-inf")))
                better = loss > best_loss
                best = torch.where(better.view(-1, 1, 1, 1), edited, best)
                best_loss = torch.where(better, loss, best_loss)
    return best


class AdversarialFTTask(nn.Module):
    """The engine's task for adversarial fine-tuning of a CLIP image encoder: one trained loss, ``<method>`` =
    lambda * clean + (1 - lambda) * adversarial, and both terms reported (detached) as ``adversarial`` and
    ``clean``. Subclasses implement :meth:`forward`.

    Args:
        model: the CLIP model; its image tower trains (group ``image_encoder``), its text tower and temperature are a
            frozen group (``text_encoder``).
        config: the method section.
    """

    loss_name: ClassVar[str]
    """The trained loss's name (the stage's ``loss_weights`` key)."""

    def __init__(self, model: ClipModel, config: AdversarialFTConfig) -> None:
        super().__init__()
        self.model = model
        self.base_config = config
        self.config = config
        self.active_losses: frozenset[str] = frozenset({self.loss_name})

    @property
    def needs(self) -> frozenset[str]:
        """``in_task_attack`` while the trained loss is active and the maximizer differentiates w.r.t. the input."""
        return frozenset(self.config.needs) if self.loss_name in self.active_losses else frozenset()

    def configure_stage(self, stage: StageSpec) -> None:
        """Check the stage's loss weights (only ``<method>``; lambda is ``method.clean_weight``) and apply its
        settings (e.g. ``attack.eps`` for an eps schedule over stages)."""
        unknown = sorted(stage.active_losses - {self.loss_name})
        if unknown:
            raise ConfigError(
                f"stages.{stage.name}.loss_weights",
                f"{unknown} cannot be weighted: the loss is {self.loss_name!r} (adversarial and clean are reported "
                "terms; their mix is method.clean_weight, lambda)",
            )
        self.config = stage_settings_applied(self.base_config, stage)
        self.active_losses = stage.active_losses

    def after_optimizer_step(self) -> None:
        """Nothing to do after a step (the temperature never trains: only the image tower does)."""

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """``image_encoder`` (what FARE and TeCoA fine-tune) and ``text_encoder`` (with the temperature)."""
        return {"image_encoder": self.model.image_parameters(), "text_encoder": self.model.text_parameters()}

    def adversarial_points(
        self, forward: Forward, x: torch.Tensor, target: Mapping[str, torch.Tensor], batch: Mapping[str, Any]
    ) -> torch.Tensor:
        """The configured maximizer's points around ``x``; random starts seeded per image by ``batch["attack_seed"]``
        (the same attack in any batch, on any rank, and again after a resume)."""
        seeds = batch.get(ATTACK_SEED)
        needs_seeds = self.config.attack.random_start or self.config.maximizer == "perturbation_sweep"
        if seeds is None and needs_seeds:
            raise KeyError(
                f"batch has no {ATTACK_SEED!r} column: the attack's random starts are seeded per image from "
                "(id, epoch); add robustfm.recipes.adversarial.AttackSeeds to the batch source's stages"
            )
        row_seeds = None if seeds is None else [int(s) for s in seeds.tolist()]
        problem = InnerProblem(forward, x, target, self.config, row_seeds, self.model)
        return MAXIMIZERS.get(self.config.maximizer)(problem)

    def mix(self, adversarial: torch.Tensor, clean: torch.Tensor) -> dict[str, torch.Tensor]:
        """The trained loss lambda * clean + (1 - lambda) * adversarial and the two reported terms."""
        weight = self.config.clean_weight
        trained = adversarial if weight == 0 else (1 - weight) * adversarial + weight * clean
        return {self.loss_name: trained, "adversarial": adversarial.detach(), "clean": clean.detach()}


def check_clip(model: Any, name: str, method: str) -> ClipModel:
    """``model`` as a ClipModel, or a ConfigError naming ``model.name``."""
    if not isinstance(model, ClipModel):
        raise ConfigError("model.name", f"{method} fine-tunes a CLIP image encoder; {name} is not open_clip")
    return model
