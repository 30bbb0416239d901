"""The config of the CG-CLIP recipe (``jobs/cgclip.py``): every section, validated before Ray starts.

Importing this module imports no torch, ray or open_clip.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from robustfm.config import TrackingConfig, check
from robustfm.data.stage_config import CorruptionStageConfig
from robustfm.gtmaps.config import GTMapConfig
from robustfm.methods.cgclip_config import CGClipConfig
from robustfm.recipes import RECIPES
from robustfm.recipes.kit_config import MilestoneEvalConfig, RecipeConfig, missing_inputs

PAPER_CURRICULUM = ("adapt", "isolate", "tune")


@dataclass(frozen=True)
class CGClipDataConfig:
    """Training and validation images, and how each batch is built."""

    shards: str | None = None
    """Shard directory (local or ``s3://``) written by ``jobs/prepare_data.py``. None: the demo data set (real
    scikit-image photos + generated images) is built under ``output_dir/demo_data`` and used."""
    train_split: str = "train"
    """Split the model trains on (minus the held-out validation part)."""
    holdout_fraction: float = 0.1
    """Share of ``train_split`` held out (every ``round(1/fraction)``-th image by index) as the validation split on
    which lambda is chosen (paper A.1: "a held-out validation split of the training data"); 0 holds out nothing."""
    eval_split: str = "val"
    """Split of ``shards`` the in-domain evaluation uses."""
    ood_shards: str | None = None
    """A second shard directory for the out-of-distribution evaluation (the paper's Caltech-256): every milestone
    also runs ``corruption_detection`` on it, logged as ``ood/corruption_detection/...``; None: skip."""
    ood_split: str = "train"
    """Split of ``ood_shards`` to evaluate (a plain ``<class>/<image>`` folder such as Caltech-256 is one split,
    "train"; nothing of it is ever trained on)."""
    image_size: int = 224
    """Side of the square input (bicubic resize; paper A.1: 224)."""
    clean_per_batch: int = 64
    """N clean images per worker batch, each with its corrupted copy: the contrastive batch is B = 2N (paper: 128)."""
    crop_scale: tuple[float, float] = (0.9, 1.0)
    """Area range of training random-resized crops."""
    corruption: CorruptionStageConfig = field(default_factory=CorruptionStageConfig)
    """Which corruption each image gets: drawn per (image, epoch) from the set, severity uniform in 1..5."""
    gt_map: GTMapConfig = field(default_factory=GTMapConfig)
    """Ground-truth corruption maps (eq. 1): VGG-16 feature L1, computed by an actor pool."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint when not AWS (only the URL; credentials come from the environment)."""

    def __post_init__(self) -> None:
        check(0 <= self.holdout_fraction < 0.5, "holdout_fraction", self.holdout_fraction, "must be in [0, 0.5)")
        check(self.image_size >= 16, "image_size", self.image_size, "must be >= 16")
        check(self.clean_per_batch >= 1, "clean_per_batch", self.clean_per_batch, "must be >= 1")
        low, high = self.crop_scale
        check(0 < low <= high <= 1, "crop_scale", self.crop_scale, "must satisfy 0 < low <= high <= 1")
        from robustfm.data.corruption_stages import resolve_corruptions

        try:
            resolve_corruptions(self.corruption.corruption_set)
        except (KeyError, ValueError) as err:
            check(False, "corruption.corruption_set", self.corruption.corruption_set, str(err))


@dataclass(frozen=True)
class CGClipRecipeConfig(RecipeConfig):
    """``jobs/cgclip.py``: CG-CLIP (paper 000) with its Adapt-Isolate-Tune curriculum."""

    name: str = "cgclip"
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="cgclip"))
    curriculum: tuple[str, ...] = PAPER_CURRICULUM
    """Stages of ``train.stages`` to run, in order: Adapt-Isolate-Tune, or an ablation (``[adapt]`` = FLYP only,
    ``[joint]``, ``[adapt, tune]`` = without Isolate, ``[adapt, isolate]`` = without Tune); ``train.stages`` defines
    ``adapt``, ``isolate``, ``tune`` and ``joint`` (the no-curriculum ablation)."""
    eval: MilestoneEvalConfig = field(
        default_factory=lambda: MilestoneEvalConfig(suites=("corruption_detection", "zero_shot"))
    )
    """Detection (the paper's metric) and zero-shot accuracy (what CLIP already knew) at every milestone."""
    method: CGClipConfig = field(default_factory=CGClipConfig)
    data: CGClipDataConfig = field(default_factory=CGClipDataConfig)


def check_paths(cfg: CGClipRecipeConfig) -> list[str]:
    """Local inputs the run needs and lacks (shards, their splits, weights files), as ``field: message`` lines."""
    data = cfg.data
    return missing_inputs(
        {
            "data.shards": (data.shards, {"data.train_split": data.train_split, "data.eval_split": data.eval_split}),
            "data.ood_shards": (data.ood_shards, {"data.ood_split": data.ood_split}),
        },
        {"model.pretrained": cfg.model.pretrained, "data.gt_map.weights": data.gt_map.weights},
    )


RECIPES.register_lazy(
    "cgclip",
    "robustfm.recipes.cgclip:run",
    config=CGClipRecipeConfig,
    default_config="configs/cgclip/demo.yaml",
    sweep="robustfm.recipes.cgclip:SWEEP",
    description="CG-CLIP (paper 000): Adapt-Isolate-Tune with a corruption decoder",
)
