"""The ``method`` section of FARE (paper 003, eq. 4: unsupervised adversarial fine-tuning of the image encoder), and
its registration in ``METHODS``. Importing this module imports neither torch nor open_clip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from robustfm.attacks import AttackConfig
from robustfm.methods import METHODS
from robustfm.methods.adversarial_config import ROBUSTVLM_EPS, AdversarialFTConfig

FARE_LOSSES = ("fare",)
FARE_REPORTS = ("adversarial", "clean")


@dataclass(frozen=True)
class FAREConfig(AdversarialFTConfig):
    """FARE: keep the image embedding of an adversarial image where the frozen *starting* encoder puts the clean one::

        adversarial = mean_i ||f(x_i + delta_i) - f0(x_i)||^2     clean = mean_i ||f(x_i) - f0(x_i)||^2

    (squared L2 summed over the embedding dimensions, unnormalized embeddings, mean over the batch: RobustVLM
    ``l2()``), with delta_i maximizing the same distance in the eps-ball. f0(x) arrives in the batch as ``target`` from
    the frozen-model data stage, built from the run's starting weights (RobustVLM hard-codes OpenAI's, wrong for the
    LAION starts of paper 003)."""

    objectives: ClassVar[tuple[str, ...]] = ("embedding_l2", "cosine_away")

    attack: AttackConfig = field(
        default_factory=lambda: AttackConfig(eps=ROBUSTVLM_EPS, steps=10, step_size=1 / 255, objective="embedding_l2")
    )
    """The inner attack: RobustVLM's Linf 4/255, 10 steps of 1/255, maximizing ``embedding_l2`` (FARE's own loss);
    ``cosine_away`` maximizes the cosine distance to f0(x) instead (paper 003 eq. 6)."""


METHODS.register_lazy(
    "fare",
    "robustfm.methods.fare:build_fare_task",
    losses=FARE_LOSSES,
    reports=FARE_REPORTS,
    param_groups=("image_encoder", "text_encoder"),
    needs=("in_task_attack",),
    config=FAREConfig,
    description="paper 003 FARE: f(x + delta) close to the frozen starting encoder's f0(x), delta adversarial",
)
