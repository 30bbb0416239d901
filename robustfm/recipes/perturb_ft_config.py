"""The config of paper 004's robustness fine-tuning recipe (``jobs/perturb_ft.py``), validated before Ray starts.

Importing this module imports no torch, ray or open_clip.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from robustfm.config import TrackingConfig, check, check_perturbation_grid
from robustfm.data.stage_config import FrozenStageConfig
from robustfm.methods.perturb_ft_config import PerturbFTConfig
from robustfm.recipes import RECIPES
from robustfm.recipes.kit_config import ImageShardsConfig, MilestoneEvalConfig, RecipeConfig, shard_recipe_inputs


@dataclass(frozen=True)
class PerturbFTDataConfig(ImageShardsConfig):
    """Training and validation images, the edits they get, and the frozen teacher that gives the targets."""

    batch_size: int = 64
    """Images per worker batch (each with its edited copy and its target embedding)."""
    perturbations: tuple[str, ...] | None = None
    """Edits drawn per image and epoch (``robustfm.perturbations.PERTURBATIONS`` names); None: all nine."""
    values_per_perturbation: int = 5
    """The value of a drawn edit is one of this many equally spaced points of its range, ends included (paper 004
    samples parameters equally spaced)."""
    teacher: FrozenStageConfig = field(default_factory=FrozenStageConfig)
    """The actor pool that holds the frozen starting encoder f0 and computes the targets f0(x)."""
    perturb_batch_size: int = 16
    """Rows per perturbation task (CPU)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_perturbation_grid(self.perturbations, self.values_per_perturbation)
        check(self.perturb_batch_size >= 1, "perturb_batch_size", self.perturb_batch_size, "must be >= 1")


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


check_paths = shard_recipe_inputs
"""Local inputs the run needs and lacks, as ``field: message`` lines (checked before Ray starts)."""

RECIPES.register_lazy(
    "perturb_ft",
    "robustfm.recipes.perturb_ft:run",
    config=PerturbFTRecipeConfig,
    default_config="configs/perturb_ft/demo.yaml",
    sweep="robustfm.recipes.perturb_ft:SWEEP",
    description="paper 004: fine-tune a CLIP image encoder for robustness to everyday perturbations",
)
