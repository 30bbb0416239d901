"""What FARE and TeCoA (paper 003) share in their ``method`` section: the inner maximizer, its attack and the clean
weight lambda; and the registry of inner maximizers.

The inner maximization of adversarial fine-tuning is a registered choice (:data:`MAXIMIZERS`): ``pgd`` (RobustVLM's
training attack, the paper's), ``apgd``, or ``perturbation_sweep`` (the worst of a grid of everyday edits, which makes
paper 004's FARE-like objective a config of FARE). Importing this module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from robustfm.attacks import AttackConfig
from robustfm.config import check, check_perturbation_grid
from robustfm.registry import Registry, did_you_mean

MAXIMIZERS: Registry = Registry("inner maximizer")
"""Name -> ``maximize(problem: robustfm.methods.adversarial.InnerProblem) -> points``
(:mod:`robustfm.methods.adversarial`). Meta ``needs``: the engine capabilities it needs (an attack differentiates
w.r.t. the input inside the task's forward: ``in_task_attack``)."""
MAXIMIZERS.register_lazy(
    "pgd",
    "robustfm.methods.adversarial:pgd_points",
    needs=("in_task_attack",),
    description="PGD with momentum, last iterate (RobustVLM's training attack: 10 steps of 1/255 at eps 4/255)",
)
MAXIMIZERS.register_lazy(
    "apgd",
    "robustfm.methods.adversarial:apgd_points",
    needs=("in_task_attack",),
    description="APGD, the highest-loss point over its iterates (RobustVLM's argparse default, not its README's)",
)
MAXIMIZERS.register_lazy(
    "perturbation_sweep",
    "robustfm.methods.adversarial:worst_perturbation",
    needs=(),
    description="per image, the everyday edit (of a grid of values per perturbation) with the highest loss; "
    "forward passes only (paper 004's objective, worst case instead of a random edit)",
)

#: RobustVLM's training attack (README FARE/TeCoA commands): Linf 4/255, 10 PGD steps of 1/255, random start.
ROBUSTVLM_EPS = 4 / 255


@dataclass(frozen=True)
class AdversarialFTConfig:
    """The inner maximization and the clean term of adversarial fine-tuning (paper 003, eq. 3-4; RobustVLM)::

        loss = lambda * clean + (1 - lambda) * adversarial

    Subclasses set the objectives their attack may maximize and the default attack."""

    objectives: ClassVar[tuple[str, ...]] = ()
    """``attack.objective`` values the method can feed (its outputs and targets)."""

    clean_weight: float = 0.0
    """lambda in [0, 1]: the weight of the loss on clean images (RobustVLM ``--clean_weight``, default 0: only the
    adversarial term). Sweep it with ``tune_spaces/fare_lr_clean_weight.yaml``."""
    maximizer: str = "pgd"
    """How the adversarial points are found: a :data:`MAXIMIZERS` name (``pgd``, ``apgd``, ``perturbation_sweep``)."""
    attack: AttackConfig = field(default_factory=AttackConfig)
    """Threat model and attack settings of ``pgd``/``apgd`` (``eps`` in [0,1] pixel units: 4/255 = 0.0157).
    Random starts are seeded per image from (id, epoch) by the recipe's ``attack_seed`` column, so a resumed run
    repeats the same attacks."""
    perturbations: tuple[str, ...] | None = None
    """``perturbation_sweep`` only: the edits tried per image (``robustfm.perturbations`` names); None: all nine."""
    values_per_perturbation: int = 5
    """``perturbation_sweep`` only: equally spaced values per edit, both ends of its range included."""

    def __post_init__(self) -> None:
        check(0.0 <= self.clean_weight <= 1.0, "clean_weight", self.clean_weight, "must be in [0, 1] (lambda)")
        names = MAXIMIZERS.names()
        check(
            self.maximizer in names,
            "maximizer",
            self.maximizer,
            f"must be one of {names}{did_you_mean(str(self.maximizer), names)}",
        )
        check(
            self.attack.objective in self.objectives,
            "attack.objective",
            self.attack.objective,
            f"must be one of {list(self.objectives)} for {type(self).__name__} (what its model outputs and targets)",
        )
        check_perturbation_grid(self.perturbations, self.values_per_perturbation)

    @property
    def needs(self) -> tuple[str, ...]:
        """The engine capabilities the configured maximizer needs (``in_task_attack`` for ``pgd``/``apgd``)."""
        return tuple(MAXIMIZERS.meta(self.maximizer)["needs"])
