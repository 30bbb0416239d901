"""The config of the CG-CLIP recipe (``jobs/cgclip.py``): every section, validated before Ray starts.

Importing this module imports no torch, ray or open_clip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from robustfm.config import TrackingConfig, check
from robustfm.data.stage_config import CorruptionStageConfig
from robustfm.gtmaps.config import GTMapConfig
from robustfm.methods.cgclip_config import CGClipConfig
from robustfm.recipes import RECIPES
from robustfm.recipes.kit_config import MilestoneEvalConfig, RecipeConfig, missing_inputs, per_worker_batch

PAPER_CURRICULUM = ("adapt", "isolate", "tune")


@dataclass(frozen=True)
class OODSetConfig:
    """An out-of-domain evaluation set: shards nothing of which is ever trained on."""

    shards: str
    """Shard directory (local or ``s3://``), e.g. Caltech-256 or CUB-200 prepared as an ``image_folder``."""
    split: str = "train"
    """Split to evaluate (a plain ``<class>/<image>`` folder is one split, "train")."""


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
    ood: dict[str, OODSetConfig] = field(default_factory=dict)
    """Named out-of-domain sets (paper 000, table 1: Caltech-256 and CUB-200): every milestone also runs
    ``corruption_detection`` on each, with the probe fitted in domain, logged as ``ood/<name>/corruption_detection/...``
    and shown in the milestone and ablation tables; empty: none."""
    image_size: int = 224
    """Side of the square input (bicubic resize; paper A.1: 224)."""
    global_batch_size: int = 128
    """Images per optimizer step over all workers, clean and corrupted together: 2N = 128 in the paper (A.1: one
    GPU). Each worker gets ``global_batch_size / (2 * train.num_workers * train.grad_accum_steps)`` clean images and
    their corrupted copies; a size that does not divide fails when the config is loaded."""
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
        check(self.global_batch_size >= 2, "global_batch_size", self.global_batch_size, "must be >= 2")
        for name in self.ood:
            check(bool(name) and "/" not in name, "ood", name, "set names must be non-empty and without '/'")
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
    detection_prompts: Literal["method", "suite"] = "method"
    """Which prompts the zero-shot detector asks with wherever this recipe evaluates a model (milestones, WiSE-FT
    mixes, ablations; sweeps always do): ``method`` = ``method.clean_prompts`` / ``corrupt_prompts``, what the model
    was trained on (the paper scores its model with its own two prompts); ``suite`` = the suite's configured prompt
    ensembles (a pretrained CLIP baseline's)."""
    probe: Literal["transfer", "refit"] = "transfer"
    """The linear-probe detector: ``transfer`` (paper 000's "CLIP + linear probe") fits it once per milestone on the
    in-domain training split (minus its held-out rows) and applies it unchanged to the in-domain test split and every
    out-of-domain set; ``refit`` fits a probe on half of each evaluated set and tests on the other half (it measures
    a set's separability, not transfer; its metrics are named ``probe_refit``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        per_worker_batch(self.data.global_batch_size, self.train, "data.global_batch_size", images_per_sample=2)

    @property
    def clean_per_worker(self) -> int:
        """Clean images per worker micro-batch (each comes with its corrupted copy)."""
        return per_worker_batch(self.data.global_batch_size, self.train, "data.global_batch_size", 2)


def check_paths(cfg: CGClipRecipeConfig) -> list[str]:
    """Local inputs the run needs and lacks (shards, their splits, weights files), as ``field: message`` lines."""
    data = cfg.data
    return missing_inputs(
        {
            "data.shards": (data.shards, {"data.train_split": data.train_split, "data.eval_split": data.eval_split}),
            **{
                f"data.ood.{name}.shards": (ood.shards, {f"data.ood.{name}.split": ood.split})
                for name, ood in data.ood.items()
            },
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
