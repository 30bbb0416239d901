"""The config of paper 004's robustness fine-tuning recipe (``jobs/perturb_ft.py``), validated before Ray starts.

Importing this module imports no torch, ray or open_clip.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from robustfm.config import TrackingConfig, check
from robustfm.data.stage_config import FrozenStageConfig
from robustfm.methods.perturb_ft_config import PerturbFTConfig
from robustfm.recipes import RECIPES
from robustfm.recipes.kit_config import MilestoneEvalConfig, RecipeConfig, missing_inputs


@dataclass(frozen=True)
class PerturbFTDataConfig:
    """Training and validation images, the edits they get, and the frozen teacher that gives the targets."""

    shards: str | None = None
    """Shard directory (local or ``s3://``) written by ``jobs/prepare_data.py``. None: the demo data set is built
    under ``output_dir/<name>/demo_data`` and used."""
    train_split: str = "train"
    """Split the model trains on (minus the held-out validation part)."""
    holdout_fraction: float = 0.1
    """Share of ``train_split`` held out (every ``round(1/fraction)``-th image) as a sweep's validation set."""
    eval_split: str = "val"
    """Split the milestone suites evaluate on (held-out images: never trained on)."""
    image_size: int = 224
    """Side of the square input."""
    batch_size: int = 64
    """Images per worker batch (each with its edited copy and its target embedding)."""
    crop_scale: tuple[float, float] = (0.9, 1.0)
    """Area range of training random-resized crops."""
    perturbations: tuple[str, ...] | None = None
    """Edits drawn per image and epoch (``robustfm.perturbations.PERTURBATIONS`` names); None: all nine."""
    values_per_perturbation: int = 5
    """The value of a drawn edit is one of this many equally spaced points of its range, ends included (paper 004
    samples parameters equally spaced)."""
    teacher: FrozenStageConfig = field(default_factory=FrozenStageConfig)
    """The actor pool that holds the frozen starting encoder f0 and computes the targets f0(x)."""
    perturb_batch_size: int = 16
    """Rows per perturbation task (CPU)."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint when not AWS (only the URL; credentials come from the environment)."""

    def __post_init__(self) -> None:
        check(0 <= self.holdout_fraction < 0.5, "holdout_fraction", self.holdout_fraction, "must be in [0, 0.5)")
        check(self.image_size >= 16, "image_size", self.image_size, "must be >= 16")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        low, high = self.crop_scale
        check(0 < low <= high <= 1, "crop_scale", self.crop_scale, "must satisfy 0 < low <= high <= 1")
        check(
            self.values_per_perturbation >= 2,
            "values_per_perturbation",
            self.values_per_perturbation,
            "must be >= 2 (the two ends of each range)",
        )
        check(self.perturb_batch_size >= 1, "perturb_batch_size", self.perturb_batch_size, "must be >= 1")
        if self.perturbations is not None:
            from robustfm.perturbations import PERTURBATIONS  # imports torch: the edits register themselves

            check(len(self.perturbations) > 0, "perturbations", self.perturbations, "must name at least one edit")
            for name in self.perturbations:
                try:
                    PERTURBATIONS.check(name)
                except KeyError as err:
                    check(False, "perturbations", name, str(err))


@dataclass(frozen=True)
class PerturbFTRecipeConfig(RecipeConfig):
    """``jobs/perturb_ft.py``: fine-tune a CLIP image encoder for robustness to everyday edits (paper 004).

    ``train.stages`` defines ``finetune``: the clean term's loss weight there is the lambda a sweep tunes."""

    name: str = "perturb-ft"
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="perturb-ft"))
    curriculum: tuple[str, ...] = ("finetune",)
    eval: MilestoneEvalConfig = field(
        default_factory=lambda: MilestoneEvalConfig(suites=("embedding_robustness", "zero_shot"), tsne=False)
    )
    """Embedding robustness (the paper's metrics) and zero-shot accuracy (utility) at every milestone."""
    method: PerturbFTConfig = field(default_factory=PerturbFTConfig)
    data: PerturbFTDataConfig = field(default_factory=PerturbFTDataConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("embedding_robustness", "zero_shot"):
            check(name in self.eval.suites, "eval.suites", self.eval.suites, f"must include {name} (the report)")
        steps = self.eval.settings.suites["embedding_robustness"].steps
        zero_shot_steps = self.eval.settings.suites["zero_shot"].perturbation_steps
        check(
            steps == zero_shot_steps,
            "eval.settings.suites.zero_shot.perturbation_steps",
            zero_shot_steps,
            f"must equal embedding_robustness.steps ({steps}): the report pairs cosine and accuracy value by value",
        )


def check_paths(cfg: PerturbFTRecipeConfig) -> list[str]:
    """Local inputs the run needs and lacks (shards, their splits, weights files), as ``field: message`` lines."""
    data = cfg.data
    return missing_inputs(
        {"data.shards": (data.shards, {"data.train_split": data.train_split, "data.eval_split": data.eval_split})},
        {"model.pretrained": cfg.model.pretrained},
    )


RECIPES.register_lazy(
    "perturb_ft",
    "robustfm.recipes.perturb_ft:run",
    config=PerturbFTRecipeConfig,
    default_config="configs/perturb_ft/demo.yaml",
    sweep="robustfm.recipes.perturb_ft:SWEEP",
    description="paper 004: fine-tune a CLIP image encoder for robustness to everyday perturbations",
)
