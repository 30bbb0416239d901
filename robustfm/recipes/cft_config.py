"""The config of CFT, concept-guided fine-tuning (paper 001, ``jobs/cft.py``), validated before Ray starts.

Importing this module imports no torch, ray or timm.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from robustfm.config import ConfigError, ModelConfig, TrackingConfig, check
from robustfm.methods import METHODS
from robustfm.methods.cft_config import CFTConfig
from robustfm.recipes import RECIPES
from robustfm.recipes.kit_config import ImageShardsConfig, MilestoneEvalConfig, RecipeConfig, shard_recipe_inputs
from robustfm.registry import did_you_mean

MASK_COLUMN = "mask"
"""The shards' column that holds S(I), the union of an image's concept masks (``jobs/prepare_data.py`` with
``source.masks``; per-concept files are merged there)."""
ALIGNMENT_LOSSES = ("concept", "non_concept")


@dataclass(frozen=True)
class CFTDataConfig(ImageShardsConfig):
    """The few training images (a few per class of a seeded class subset) with their concept masks.

    The authors' train transform resizes to 256 x 256 and takes a random 224 crop with a flip (image and mask alike);
    ours is the platform's joint random-resized crop (area ``crop_scale``, aspect 3/4..4/3) and flip."""

    batch_size: int = 8
    """Images per worker batch (paper §4.2: 8)."""
    crop_scale: tuple[float, float] = (0.77, 1.0)
    """Area range of training crops: 224/256 squared is 0.77, the authors' crop."""
    holdout_fraction: float = 0.0
    """CFT trains on 3 images per class: nothing is held out by default."""
    classes: int | None = 500
    """Training classes drawn from the training split's sorted class names with a seeded permutation (paper §4.2:
    500 of ImageNet-1k's, following Yosinski et al.). None: every class of the split."""
    images_per_class: int = 3
    """Training images per class, drawn with the same seed (paper §4.2: 3, i.e. 1,500 images)."""
    class_seed: int | None = None
    """Seed of the class and image draws (the paper's 5 seeds vary the class subset). None: the run's ``seed``."""
    class_list: str | None = None
    """A text file of class names (wnids for ImageNet), one per line, used instead of the seeded draw."""
    label_space: Literal["present", "imagenet1k"] = "imagenet1k"
    """How a class name becomes the classifier's logit column: ``imagenet1k`` (a wnid, class index or unambiguous
    lemma, mapped with timm's ImageNet info: the converter labels a subset of folders 0..k-1) or ``present`` (the
    split's classes in label order: a classifier trained on these classes, as in the demo)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.classes is None or self.classes >= 1, "classes", self.classes, "must be >= 1 or null")
        check(self.images_per_class >= 1, "images_per_class", self.images_per_class, "must be >= 1")


@dataclass(frozen=True)
class CFTRecipeConfig(RecipeConfig):
    """``jobs/cft.py``: fine-tune a timm classifier so that its relevance maps fall on the concepts of its classes.

    The lambdas live in ``method`` under the paper's names; each stage's ``loss_weights`` are their products (the
    engine adds weighted losses). A stage that still has the paper's products gets the method's; one that sets other
    weights must agree with the lambdas, else the config fails, naming both."""

    name: str = "cft"
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="cft"))
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="timm/vit_base_patch16_224"))
    curriculum: tuple[str, ...] = ("finetune",)
    eval: MilestoneEvalConfig = field(
        default_factory=lambda: MilestoneEvalConfig(suites=("classification", "relevance_alignment"), tsne=False)
    )
    """Top-1/top-5 (in and out of distribution, fine-tuned vs held-out classes) and relevance vs masks (PA, mIoU,
    mAP) at every milestone."""
    method: CFTConfig = field(default_factory=CFTConfig)
    data: CFTDataConfig = field(default_factory=CFTDataConfig)

    model_family: ClassVar[tuple[str, str]] = (
        "timm/",
        "must be a timm classifier (timm/<arch>): CFT explains and keeps its class logits",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        from robustfm.train.capabilities import check_capabilities

        stages = {name: self._stage_weights(name) for name in self.curriculum}
        train = dataclasses.replace(self.train, stages={**self.train.stages, **stages})
        object.__setattr__(self, "train", train)
        needs = METHODS.meta("cft")["needs"] if self._trains_alignment() else ()
        check_capabilities(self.train, needs, prefix="train")

    def _stage_weights(self, name: str) -> object:
        """Stage ``name`` with ``loss_weights`` = the lambdas' products (see the class docstring)."""
        stage = self.train.stages[name]
        wanted = self.method.loss_weights()
        given = dict(stage.loss_weights)
        if _same(given, CFTConfig().loss_weights()) or _same(given, wanted):
            return dataclasses.replace(stage, loss_weights=wanted)
        raise ConfigError(
            f"train.stages.{name}.loss_weights",
            f"{given} disagree with the method's lambdas, whose products are {wanted} (loss = lambda_align * "
            "(lambda_concept * concept + lambda_non_concept * non_concept) + lambda_cls * cls): set the lambdas "
            "under method.*, and leave the stage weights at the paper's products or at these",
        )

    def _trains_alignment(self) -> bool:
        return any(self.train.stages[s].loss_weights.get(n, 0) > 0 for s in self.curriculum for n in ALIGNMENT_LOSSES)


def _same(a: dict[str, float], b: dict[str, float]) -> bool:
    return set(a) == set(b) and all(math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-12) for k in a)


def check_inputs(cfg: CFTRecipeConfig) -> list[str]:
    """What the run needs and lacks, as ``field: message`` lines (checked before Ray starts): the shards and their
    splits, the weights file, the mask column when a concept loss is weighted, the class-list file and its names."""
    problems = shard_recipe_inputs(cfg)
    if problems or cfg.data.shards is None or "://" in cfg.data.shards:
        return problems + _class_list_problems(cfg, None)
    from robustfm.data.shards import Location, list_split

    listing = list_split(Location(cfg.data.shards), cfg.data.train_split)
    if cfg._trains_alignment() and MASK_COLUMN not in listing.columns:
        problems.append(
            f"data.shards: {cfg.data.shards} has no {MASK_COLUMN!r} column (the concept masks the weighted concept "
            f"losses read); prepare it with source.masks, or set the stage's concept weights to 0"
        )
    names = sorted(set(listing.read_rows(["class_name"])["class_name"]))
    return problems + _class_list_problems(cfg, names)


def _class_list_problems(cfg: CFTRecipeConfig, known: list[str] | None) -> list[str]:
    path = cfg.data.class_list
    if path is None:
        return []
    if not Path(path).is_file():
        return [f"data.class_list: no file at {path}"]
    listed = read_class_list(path)
    if not listed:
        return [f"data.class_list: {path} lists no class"]
    if known is None:
        return []
    unknown = [name for name in listed if name not in set(known)]
    return [
        f"data.class_list: {name!r} (in {path}) is not a class of split {cfg.data.train_split!r}"
        f"{did_you_mean(name, known)}"
        for name in unknown[:5]
    ]


def read_class_list(path: str) -> list[str]:
    """Class names, one per line (blank lines and ``#`` comments skipped), in file order."""
    lines = (line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines())
    return [line for line in lines if line]


RECIPES.register_lazy(
    "cft",
    "robustfm.recipes.cft:run",
    config=CFTRecipeConfig,
    default_config="configs/cft/demo.yaml",
    sweep="robustfm.recipes.cft:SWEEP",
    description="paper 001 CFT: relevance maps of a timm classifier aligned with concept masks",
)
