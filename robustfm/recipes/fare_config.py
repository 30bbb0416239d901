"""The config of the FARE recipe (``jobs/fare.py``), validated before Ray starts. Imports no ray or open_clip."""

from __future__ import annotations

from dataclasses import dataclass, field

from robustfm.config import TrackingConfig
from robustfm.data.stage_config import FrozenStageConfig
from robustfm.methods.fare_config import FAREConfig
from robustfm.recipes import RECIPES
from robustfm.recipes.adversarial_config import AdversarialDataConfig, AdversarialRecipeConfig
from robustfm.recipes.kit_config import shard_recipe_inputs


@dataclass(frozen=True)
class FAREDataConfig(AdversarialDataConfig):
    """Training images and the frozen starting encoder that gives FARE's targets f0(x)."""

    teacher: FrozenStageConfig = field(default_factory=FrozenStageConfig)
    """The actor pool that holds the frozen starting encoder f0 and computes ``target`` = f0(image)."""


@dataclass(frozen=True)
class FARERecipeConfig(AdversarialRecipeConfig):
    """``jobs/fare.py``: FARE adversarial fine-tuning of a CLIP image encoder (paper 003).

    ``train.stages`` defines ``finetune`` (its loss ``fare``; lambda is ``method.clean_weight``)."""

    name: str = "fare"
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="fare"))
    method: FAREConfig = field(default_factory=FAREConfig)
    data: FAREDataConfig = field(default_factory=FAREDataConfig)


check_paths = shard_recipe_inputs
"""Local inputs the run needs and lacks, as ``field: message`` lines (checked before Ray starts)."""

RECIPES.register_lazy(
    "fare",
    "robustfm.recipes.fare:run",
    config=FARERecipeConfig,
    default_config="configs/fare/demo.yaml",
    sweep="robustfm.recipes.fare:SWEEP",
    description="paper 003 FARE: unsupervised adversarial fine-tuning of a CLIP image encoder",
)
