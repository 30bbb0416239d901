"""Config sections every recipe shares: what a milestone measures and what is exported. Imports no torch or ray."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from robustfm.config import ModelConfig, RayConfig, TrackingConfig, check
from robustfm.evals.config import EvalConfig
from robustfm.train.config import TrainConfig


@dataclass(frozen=True)
class ImageShardsConfig:
    """Where a recipe's images come from and how they are cut: the fields every shard-reading recipe shares (a
    recipe's data section subclasses it, sets its own defaults and adds what its method needs)."""

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
    """Images per worker batch."""
    crop_scale: tuple[float, float] = (0.9, 1.0)
    """Area range of training random-resized crops."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint when not AWS (only the URL; credentials come from the environment)."""

    def __post_init__(self) -> None:
        check(0 <= self.holdout_fraction < 0.5, "holdout_fraction", self.holdout_fraction, "must be in [0, 0.5)")
        check(self.image_size >= 16, "image_size", self.image_size, "must be >= 16")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        low, high = self.crop_scale
        check(0 < low <= high <= 1, "crop_scale", self.crop_scale, "must satisfy 0 < low <= high <= 1")


@dataclass(frozen=True)
class MilestoneEvalConfig:
    """What is measured at each milestone (pretrained, after each stage) and on the WiSE-FT mixes."""

    enabled: bool = True
    """Evaluate at milestones (False: train and export only, e.g. in sweeps and smoke runs)."""
    suites: tuple[str, ...] = ("zero_shot",)
    """Suites run at every milestone (``robustfm.evals.SUITES`` names); each recipe sets its own default."""
    milestones: tuple[str, ...] | None = None
    """Which milestones to evaluate: ``pretrained``, a curriculum prefix (``adapt-isolate``) or ``final`` (after the
    last stage). None: every one. Skipped milestones are not cached: a later run that asks for them evaluates them."""
    tsne: bool = True
    """Save a t-SNE PNG of clean vs edited image embeddings at each milestone (recipes that have an edit)."""
    tsne_samples: int = 256
    """Images (each clean and edited) in the t-SNE plot."""
    settings: EvalConfig = field(default_factory=EvalConfig)
    """Seed, actor pool and every suite's section (``settings.suites.<suite>``); a suite whose ``data.shards`` is
    null reads the recipe's own evaluation split."""

    def __post_init__(self) -> None:
        from robustfm.evals import SUITES

        for name in self.suites:
            try:
                SUITES.check(name)
            except KeyError as err:
                check(False, "suites", name, str(err))
        check(self.tsne_samples >= 8, "tsne_samples", self.tsne_samples, "must be >= 8")


@dataclass(frozen=True)
class ExportConfig:
    """The exported model (open_clip layout, method-only heads left out) and its WiSE-FT mixes."""

    wise_ft_alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    """Mixing coefficients between the pretrained (0) and the fine-tuned (1) image tower; each is exported and
    evaluated, and the recipe's headline metric is plotted against zero-shot retention. Empty: export the
    fine-tuned model only."""

    def __post_init__(self) -> None:
        check(all(0 <= a <= 1 for a in self.wise_ft_alphas), "wise_ft_alphas", self.wise_ft_alphas, "must be in [0, 1]")


@dataclass(frozen=True)
class RecipeConfig:
    """The sections every recipe config has; a recipe's config subclasses it, adds its ``method`` and ``data``
    sections and sets its own defaults (name, experiment, curriculum, milestone suites)."""

    name: str = "run"
    """Run name: MLflow parent run, checkpoint folder and output folder."""
    output_dir: str = "outputs"
    """Local folder for exports, reports and plots (``<output_dir>/<name>``)."""
    seed: int = 0
    """Seeds data order, crops, edits and initialisation."""
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="open_clip/ViT-B-32", pretrained="openai"))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(stages={}))
    """The stages that may run: trainable groups, learning rates, loss weights, strategy, workers, storage."""
    curriculum: tuple[str, ...] = ()
    """Stages of ``train.stages`` to run, in order."""
    eval: MilestoneEvalConfig = field(default_factory=MilestoneEvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    model_family: ClassVar[tuple[str, str]] = (
        "open_clip/",
        "must be an open_clip model (recipes fine-tune CLIP and measure zero-shot accuracy with its text tower)",
    )
    """The ``model.name`` prefix this recipe's method needs, and the message when another is given."""

    def __post_init__(self) -> None:
        check(bool(self.name) and "/" not in self.name, "name", self.name, "must be a non-empty name without '/'")
        check(len(self.curriculum) > 0, "curriculum", self.curriculum, "must name at least one stage")
        for stage in self.curriculum:
            check(
                stage in self.train.stages,
                "curriculum",
                stage,
                f"names a stage that train.stages does not define ({', '.join(self.train.stages) or 'none'})",
            )
        check(
            len(set(self.curriculum)) == len(self.curriculum), "curriculum", self.curriculum, "must not repeat a stage"
        )
        family, requirement = self.model_family
        check(self.model.name.startswith(family), "model.name", self.model.name, requirement)
        known = ["pretrained", "final", *("-".join(self.curriculum[: i + 1]) for i in range(len(self.curriculum)))]
        for name in self.eval.milestones or ():
            check(name in known, "eval.milestones", name, f"is not a milestone of this run ({', '.join(known)})")

    def evaluates(self, milestone: str) -> bool:
        """Whether milestone ``milestone`` (``pretrained`` or a curriculum prefix) is evaluated in this run."""
        wanted = self.eval.milestones
        if not self.eval.enabled:
            return False
        if wanted is None or milestone in wanted:
            return True
        return "final" in wanted and milestone == "-".join(self.curriculum)


def per_worker_batch(global_batch: int, train: TrainConfig, field_name: str, images_per_sample: int = 1) -> int:
    """Samples per worker micro-batch that make ``global_batch`` images per optimizer step over all workers
    (``images_per_sample``: images each sample brings, e.g. 2 for a clean image and its corrupted copy).

    Raises:
        ConfigError: naming ``field_name`` when the global batch does not divide evenly.
    """
    parts = train.num_workers * train.grad_accum_steps * images_per_sample
    check(
        global_batch % parts == 0 and global_batch >= parts,
        field_name,
        global_batch,
        f"must be a positive multiple of {parts} = {train.num_workers} workers x {train.grad_accum_steps} "
        f"accumulation steps x {images_per_sample} image(s) per sample",
    )
    return global_batch // parts


def missing_inputs(
    shards: Mapping[str, tuple[str | None, Mapping[str, str]]], weights: Mapping[str, str | None]
) -> list[str]:
    """What a run needs on local disk and lacks, as ``field: message`` lines (``s3://`` paths are checked by the run).

    Args:
        shards: config field -> (shard directory or None, {split field: split it must have}).
        weights: config field -> a weights value; one that looks like a path (has a ``/`` or a weights suffix) must
            be an existing file (tags such as ``openai`` and torchvision names pass).
    """
    problems = []
    for field_name, (path, split_fields) in shards.items():
        if path is None or path.startswith("s3://"):
            continue
        manifest = Path(path) / "manifest.json"
        if not manifest.is_file():
            problems.append(
                f"{field_name}: no shards at {path!r} (expected {path}/manifest.json, written by jobs/prepare_data.py)"
            )
            continue
        splits = sorted(json.loads(manifest.read_text()).get("splits", {}))
        for split_field, split in split_fields.items():
            if split not in splits:
                problems.append(f"{split_field}: no split {split!r} in {path} (its splits: {', '.join(splits)})")
    for field_name, value in weights.items():
        looks_like_path = value is not None and ("/" in value or value.endswith((".safetensors", ".pt", ".pth")))
        if looks_like_path and not value.startswith("s3://") and not Path(value).is_file():
            problems.append(f"{field_name}: weights file {value!r} does not exist")
    return problems


def shard_recipe_inputs(cfg: RecipeConfig) -> list[str]:
    """Local inputs a recipe whose ``data`` is an :class:`ImageShardsConfig` needs and lacks (its shards and their
    splits, the weights file), as ``field: message`` lines."""
    data = cfg.data
    return missing_inputs(
        {"data.shards": (data.shards, {"data.train_split": data.train_split, "data.eval_split": data.eval_split})},
        {"model.pretrained": cfg.model.pretrained},
    )
