"""The ``method`` section of CFT, concept-guided fine-tuning (paper 001 §3), and its registration in ``METHODS``.

Where the paper and the authors' code (``yonisGit/cft``) differ, the paper is the default and the code's variant is one
value away (spec ``cft-cci-covar.md`` §1.1, fact 1). Importing this module imports neither torch nor timm: the
relevance names are checked against a light copy of :data:`robustfm.explain.RELEVANCE`'s, and only a name missing
from it imports the registry itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from robustfm.config import ConfigError, check
from robustfm.methods import METHODS
from robustfm.registry import did_you_mean

CFT_LOSSES = ("concept", "non_concept", "cls")
"""Eq 3, eq 4 and eq 6, unweighted: the engine weights them with the stage's ``loss_weights``."""
CFT_REPORTS = ("empty_concept", "empty_non_concept", "constant_map")
"""Detached fractions of the batch, logged with the losses: samples whose concept region S (or its complement) is
empty, and samples whose relevance map was constant; each left out of the terms it cannot inform."""

KNOWN_RELEVANCE = ("attn_gradcam", "attnlrp", "gae", "gradcam", "input_gradient", "rollout")
"""The :data:`robustfm.explain.RELEVANCE` names at the time of writing, so that the default config stays light
(``tests/unit/test_cft_method.py`` checks the copy against the registry)."""
RELEVANCE_TARGETS = ("label", "prediction")
LOSS_RESOLUTIONS = ("patch", "pixel")
NORMALIZATIONS = ("region", "all_pixels")
CLS_TARGETS = ("prediction", "label")


def check_choice(value: str, choices: Sequence[str], field: str) -> None:
    """ConfigError on ``field`` unless ``value`` is one of ``choices``, with a "did you mean"."""
    check(value in choices, field, value, f"must be one of {list(choices)}{did_you_mean(str(value), list(choices))}")


def check_weights(config: object, names: Sequence[str]) -> None:
    """ConfigError on the first field of ``names`` that is negative (a weight of a minimised loss)."""
    for name in names:
        value = getattr(config, name)
        check(value >= 0, name, value, "must be >= 0 (a negative weight would maximise the loss)")


def check_relevance(name: str, field: str = "relevance") -> None:
    """ConfigError on ``field`` unless ``name`` is a registered relevance method. Known names need no torch; any other
    name is looked up in the registry (which imports torch) so that newly registered methods are accepted."""
    if name in KNOWN_RELEVANCE:
        return
    from robustfm.explain.relevance import RELEVANCE

    names = RELEVANCE.names()
    if name not in names:
        raise ConfigError(field, f"unknown relevance method {name!r}{did_you_mean(str(name), names)} (known: {names})")


@dataclass(frozen=True)
class CFTConfig:
    """CFT's losses (paper 001 eqs 3-7) with the paper's names::

        L = lambda_align * (lambda_concept * L_concept + lambda_non_concept * L_non_concept) + lambda_cls * L_cls

    The engine adds weighted losses, so a stage's ``loss_weights`` are the products (:meth:`loss_weights`: 0.4, 0.96,
    0.2 with the paper's values); the recipe writes them from here.
    """

    lambda_align: float = 0.8
    """Weight of the alignment loss (eq 7; paper Table 8 and §4.2, all models; code ``--lambda_align``)."""
    lambda_concept: float = 0.5
    """Weight of L_concept inside the alignment loss (eq 5; code ``--lambda_concept``)."""
    lambda_non_concept: float = 1.2
    """Weight of L_non-concept inside the alignment loss (eq 5; code ``--lambda_ctx``)."""
    lambda_cls: float = 0.2
    """Weight of the classification-consistency loss (eq 7; code ``--lambda_acc``)."""
    relevance: str = "attnlrp"
    """The relevance map Phi: a ``robustfm.explain.RELEVANCE`` name. ``attnlrp`` (paper §3.2); ``gae`` is what the
    authors' code computes (its ``lrp``: Chefer's gradient-weighted rollout). On a CNN only ``input_gradient`` runs
    (the others read attention or tokens)."""
    grad_graph: bool = False
    """``gae`` only (ignored by the others): differentiate through dy/dA as well (full second order). False is the
    code's (``autograd.grad`` without ``create_graph``: training flows through the attention A only)."""
    relevance_target: str = "label"
    """Which logit Phi explains: ``label`` (ground truth, the code's ``index=targets``) or ``prediction`` (the argmax
    of the current logits; the paper says "the class output score")."""
    loss_resolution: str = "patch"
    """``patch``: Phi on the patch grid (the paper's H x W), the mask reduced to the grid (a patch is in S when at
    least half its area is). ``pixel``: Phi bilinearly upsampled to the image (the code's, which made the published
    numbers)."""
    normalize: str = "region"
    """``region``: eqs 3-4, the mean of -log over S (and over S-bar) per sample, then over the batch; a sample with an
    empty region drops out of that term. ``all_pixels``: the code's ``BCELoss(Phi*S, S)`` and ``BCELoss(Phi*(1-S),
    0)``, sums over the region divided by every pixel of the batch."""
    cls_target: str = "prediction"
    """The class of L_cls: ``prediction`` (eq 6: argmax of the current model's logits, no gradient through it) or
    ``label`` (Table 6 "w/ ground-truth")."""
    temperature: float = 1.0
    """L_cls = CE(logits / temperature, target) (the code's flag; RobustViT's README uses 0.65 for DeiT-B)."""

    def __post_init__(self) -> None:
        check_weights(self, ("lambda_align", "lambda_concept", "lambda_non_concept", "lambda_cls"))
        check_relevance(self.relevance)
        check_choice(self.relevance_target, RELEVANCE_TARGETS, "relevance_target")
        check_choice(self.loss_resolution, LOSS_RESOLUTIONS, "loss_resolution")
        check_choice(self.normalize, NORMALIZATIONS, "normalize")
        check_choice(self.cls_target, CLS_TARGETS, "cls_target")
        check(self.temperature > 0, "temperature", self.temperature, "must be > 0")

    def loss_weights(self) -> dict[str, float]:
        """The engine's ``loss_weights`` for eq 7: ``{concept, non_concept, cls}`` as the products of the lambdas."""
        return {
            "concept": self.lambda_align * self.lambda_concept,
            "non_concept": self.lambda_align * self.lambda_non_concept,
            "cls": self.lambda_cls,
        }


# The relevance loss differentiates a gradient that the map's own backward pass took inside forward with
# create_graph=True w.r.t. activations (attention probabilities, token features, the normalised input), never w.r.t.
# the parameters: that is `double_backward_input` in robustfm.train.capabilities (`double_backward_params` is a
# penalty on a gradient w.r.t. the weights). Only the relevance terms need it; a `cls`-only stage needs nothing.
METHODS.register_lazy(
    "cft",
    "robustfm.methods.cft:build_cft_task",
    losses=CFT_LOSSES,
    reports=CFT_REPORTS,
    param_groups=("backbone", "head"),
    needs=("double_backward_input",),
    config=CFTConfig,
    description="paper 001 CFT: align a timm classifier's relevance map with concept masks (eqs 3-4) while keeping "
    "its own predictions (eq 6)",
)
