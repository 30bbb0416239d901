"""What the FARE and TeCoA recipe configs share: the data section, the milestone suites and the checks that must fail
before Ray starts (a stage that trains the text tower, a strategy that cannot run an attack inside the task, a
report without an attack condition). Importing this module imports no ray or open_clip.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from robustfm.config import check, replace_path
from robustfm.config.core import ConfigError
from robustfm.recipes.kit_config import ImageShardsConfig, MilestoneEvalConfig, RecipeConfig


@dataclass(frozen=True)
class AdversarialDataConfig(ImageShardsConfig):
    """Training and validation images of adversarial fine-tuning (RobustVLM's values as defaults)."""

    holdout_fraction: float = 0.01
    """Share of ``train_split`` held out (every ``round(1/fraction)``-th image) as a sweep's validation set."""
    image_size: int = 224
    """Side of the square input (RobustVLM: 224 for every backbone; ConvNeXt-B runs at 224 too, paper 003 App. A)."""
    batch_size: int = 128
    """Images per worker batch (RobustVLM: 128 in total)."""
    augment: bool = False
    """False: resize the shorter side + centre crop, as RobustVLM trains (no augmentation). True: robustfm's seeded
    random-resized crop + flip (``crop_scale``)."""


def adversarial_milestones() -> MilestoneEvalConfig:
    """Zero-shot accuracy clean and under APGD (the headline), embedding robustness and 2AFC perceptual similarity
    clean and with the reference attacked (paper 003's R-CLIP metrics), at every milestone."""
    return MilestoneEvalConfig(suites=("zero_shot", "embedding_robustness", "two_afc"), tsne=False)


@dataclass(frozen=True)
class AdversarialRecipeConfig(RecipeConfig):
    """The checks of an adversarial fine-tuning recipe; subclasses add ``method`` (an
    :class:`~robustfm.methods.adversarial_config.AdversarialFTConfig`) and ``data``."""

    curriculum: tuple[str, ...] = ("finetune",)
    eval: MilestoneEvalConfig = field(default_factory=adversarial_milestones)

    def __post_init__(self) -> None:
        super().__post_init__()
        check("zero_shot" in self.eval.suites, "eval.suites", self.eval.suites, "must include zero_shot (the report)")
        zero_shot = self.eval.settings.suites["zero_shot"]
        check(
            len(zero_shot.attacks) > 0,
            "eval.settings.suites.zero_shot.attacks",
            zero_shot.attacks,
            "must name an attack (apgd_ce): robust zero-shot accuracy is what the method improves",
        )
        needs: set[str] = set()
        for name in self.curriculum:
            stage = self.train.stages[name]
            check(
                tuple(stage.trainable) == ("image_encoder",),
                f"train.stages.{name}.trainable",
                stage.trainable,
                "must be [image_encoder]: the text tower and the temperature stay as they are (the zero-shot "
                "classifier, and TeCoA's targets)",
            )
            method = self.method
            for key, value in stage.settings.items():
                try:
                    method = replace_path(method, key, value)
                except ConfigError as err:
                    raise ConfigError(f"train.stages.{name}.settings.{key}", err.message) from None
            needs |= set(method.needs)
        from robustfm.train.capabilities import check_capabilities  # light: no torch

        check_capabilities(self.train, needs, prefix="train")

    def headline(self) -> str:
        """The milestone metric the method improves: robust zero-shot top-1 under every attack, at the evaluated
        radius nearest to the training attack's."""
        from robustfm.evals.zero_shot_attacks import ALL_ATTACKS, condition

        zero_shot = self.eval.settings.suites["zero_shot"]
        eps = min(zero_shot.attack_eps, key=lambda e: abs(e - self.method.attack.eps))
        return f"zero_shot/{condition(ALL_ATTACKS, zero_shot.attack_norm, eps)}/robust_top1"


def replace_data(cfg: AdversarialRecipeConfig, **changes: object) -> AdversarialRecipeConfig:
    """``cfg`` with fields of its data section replaced."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **changes))
