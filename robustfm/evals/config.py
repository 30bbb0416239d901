"""Configs of the evaluation suites: where their data comes from, how the actor pool is sized, and each suite's knobs.

Every field here is part of a result's protocol (see :mod:`robustfm.evals.protocol`): two numbers are comparable only
when the fields that shaped them are equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from robustfm.config.core import check
from robustfm.config.schema import RayConfig, TrackingConfig

# Object-agnostic prompts of CG-CLIP (paper 000, stage 1); lists so that more phrasings can be averaged.
CLEAN_PROMPTS = ("a clean photograph", "a clean photo", "a sharp, undistorted photo")
CORRUPT_PROMPTS = ("a corrupt photograph", "a corrupted photo", "a noisy, blurry or distorted photo")
# A short subset of CLIP's ImageNet templates; ``{}`` is the class name.
CLASS_TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a good photo of a {}.", "a photo of the large {}.")


@dataclass(frozen=True)
class EvalDataConfig:
    """The images a suite scores: Parquet shards (``robustfm.data`` format) or generated synthetic rows."""

    shards: str | None = None
    """Shard directory (local or ``s3://``) read with ``robustfm.data.open_shards``. None: synthetic data (below)."""
    split: str = "val"
    """Shard split to read."""
    max_samples: int | None = None
    """Score only the first N rows in id order (None: all). The protocol hashes exactly the ids used."""
    synthetic_samples: int = 32
    """Rows of synthetic data (random textured images, labels, captions) when ``shards`` is None."""
    synthetic_classes: int = 4
    """Classes of the synthetic data."""
    synthetic_image_size: int = 48
    """Side of the synthetic images (they are encoded as PNG and decoded like real files)."""
    synthetic_bad_images: int = 0
    """Of the synthetic rows, how many (the last ones) carry bytes that are not an image, to exercise skip counting."""

    def __post_init__(self) -> None:
        check(self.max_samples is None or self.max_samples > 0, "max_samples", self.max_samples, "must be positive")
        check(self.synthetic_samples > 0, "synthetic_samples", self.synthetic_samples, "must be positive")
        check(self.synthetic_classes > 1, "synthetic_classes", self.synthetic_classes, "must be at least 2")
        check(
            0 <= self.synthetic_bad_images <= self.synthetic_samples,
            "synthetic_bad_images",
            self.synthetic_bad_images,
            "must be in 0..synthetic_samples",
        )
        check(self.synthetic_image_size >= 8, "synthetic_image_size", self.synthetic_image_size, "must be >= 8")


@dataclass(frozen=True)
class ActorPoolConfig:
    """The Ray Data actor pool that scores batches (``ActorPoolStrategy(min_size, max_size)``)."""

    min_actors: int = 1
    """Actors kept alive; the pool grows towards ``max_actors`` while work is queued (and the cluster has room)."""
    max_actors: int = 2
    """Upper bound of the pool; on an autoscaling cluster this is what the autoscaler may add nodes for."""
    num_cpus: float = 1.0
    """CPUs each actor reserves. Use a fraction when data-reading tasks must run beside the actors on few cores."""
    num_gpus: float = 0.0
    """GPUs each actor reserves (its model then runs on CUDA)."""
    threads: int = 1
    """``torch.set_num_threads`` inside each actor: one thread per reserved CPU keeps actors from oversubscribing."""
    batch_size: int = 16
    """Rows per scored batch."""
    wait_for_min_actors_s: int = 600
    """Hold batches until ``min_actors`` actors have built their model (Ray Data's ``wait_for_min_actors_s``), so
    work spreads over the whole minimum pool; fails after this many seconds. 0: start with the first ready actor."""

    def __post_init__(self) -> None:
        check(self.min_actors >= 1, "min_actors", self.min_actors, "must be >= 1")
        check(self.max_actors >= self.min_actors, "max_actors", self.max_actors, "must be >= min_actors")
        check(self.num_cpus >= 0, "num_cpus", self.num_cpus, "must be >= 0")
        check(self.num_gpus >= 0, "num_gpus", self.num_gpus, "must be >= 0")
        check(self.threads >= 1, "threads", self.threads, "must be >= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        check(self.wait_for_min_actors_s >= 0, "wait_for_min_actors_s", self.wait_for_min_actors_s, "must be >= 0")


@dataclass(frozen=True)
class CorruptionDetectionConfig:
    """Clean-vs-corrupted detection from image embeddings (CG-CLIP's evaluation, appendix A.2)."""

    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """Images to corrupt; each is scored clean and once per corruption."""
    corruptions: tuple[str, ...] | None = None
    """Corruptions to apply (None: the ``seen`` then ``unseen`` sets of ``robustfm.corruptions.CORRUPTION_SETS``)."""
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    """Severities drawn per (image, corruption) from the sample's seed, uniformly."""
    clean_prompts: tuple[str, ...] = CLEAN_PROMPTS
    """Zero-shot prompts of the "clean" class (their normalized text embeddings are averaged)."""
    corrupt_prompts: tuple[str, ...] = CORRUPT_PROMPTS
    """Zero-shot prompts of the "corrupt" class."""
    probe_train_fraction: float = 0.5
    """Images (by a hash of their id) whose clean and corrupted embeddings train the linear probe; the rest test."""
    probe_train_set: str = "seen"
    """Which corruptions the probe sees in training: a ``CORRUPTION_SETS`` name or ``all`` (tests use every one)."""
    probe_c: float = 1.0
    """Inverse L2 regularization of the logistic-regression probe."""
    threshold: float = 0.5
    """Decision threshold on P(corrupt) for accuracy and F1 (AUROC is threshold-free)."""

    def __post_init__(self) -> None:
        check(
            len(self.severities) > 0 and all(1 <= s <= 5 for s in self.severities),
            "severities",
            self.severities,
            "must be a non-empty list of values in 1..5",
        )
        check(len(self.clean_prompts) > 0, "clean_prompts", self.clean_prompts, "must not be empty")
        check(len(self.corrupt_prompts) > 0, "corrupt_prompts", self.corrupt_prompts, "must not be empty")
        check(0 < self.probe_train_fraction < 1, "probe_train_fraction", self.probe_train_fraction, "must be in (0, 1)")
        check(self.probe_c > 0, "probe_c", self.probe_c, "must be positive")
        check(0 < self.threshold < 1, "threshold", self.threshold, "must be in (0, 1)")


@dataclass(frozen=True)
class ZeroShotConfig:
    """Zero-shot classification with class-name prompts, clean and under corruptions and perturbations."""

    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """Labelled images (``label``, ``class_name`` columns); class names are read from the data, ordered by label."""
    templates: tuple[str, ...] = CLASS_TEMPLATES
    """Prompt templates with one ``{}`` for the class name; a class's text embedding is their normalized mean."""
    corruptions: tuple[str, ...] | None = None
    """Corruptions to evaluate under (None: ``seen`` + ``unseen`` sets)."""
    severities: tuple[int, ...] = (3,)
    """Severities per corruption (each is its own condition)."""
    perturbations: tuple[str, ...] | None = None
    """Perturbations to evaluate under (None: every registered one)."""
    perturbation_steps: int = 3
    """Equally spaced values per perturbation (``robustfm.perturbations.sweep``); each value is a condition."""

    def __post_init__(self) -> None:
        check(
            len(self.templates) > 0 and all("{}" in t for t in self.templates),
            "templates",
            self.templates,
            "must be a non-empty list of strings with one '{}'",
        )
        check(all(1 <= s <= 5 for s in self.severities), "severities", self.severities, "must be in 1..5")
        check(self.perturbation_steps >= 1, "perturbation_steps", self.perturbation_steps, "must be >= 1")


@dataclass(frozen=True)
class EmbeddingRobustnessConfig:
    """Embedding stability over perturbation sweeps (paper 004): mean/worst cosine and DivergenceRadius."""

    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """Images to perturb."""
    perturbations: tuple[str, ...] | None = None
    """Perturbations to sweep (None: every registered one)."""
    steps: int = 9
    """Equally spaced parameter values per perturbation, ends included."""

    def __post_init__(self) -> None:
        check(self.steps >= 2, "steps", self.steps, "must be >= 2 (an enclosing ball of one point is trivial)")


@dataclass(frozen=True)
class RetrievalConfig:
    """Image-to-text and text-to-image retrieval over COCO-style captions."""

    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """Images with a ``captions`` list column."""
    captions_per_image: int = 5
    """Captions used per image (the first N; COCO has 5). Images with fewer are skipped and counted."""
    ks: tuple[int, ...] = (1, 5, 10)
    """Recall@K cut-offs."""

    def __post_init__(self) -> None:
        check(self.captions_per_image >= 1, "captions_per_image", self.captions_per_image, "must be >= 1")
        check(len(self.ks) > 0 and all(k >= 1 for k in self.ks), "ks", self.ks, "must be positive integers")


@dataclass(frozen=True)
class EvalConfig:
    """Everything that shapes evaluation numbers, shared by every suite."""

    seed: int = 0
    """Run seed of every per-sample draw (corruption choice, severity, noise, probe split)."""
    pool: ActorPoolConfig = field(default_factory=ActorPoolConfig)
    """The scoring actor pool."""
    corruption_detection: CorruptionDetectionConfig = field(default_factory=CorruptionDetectionConfig)
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    embedding_robustness: EmbeddingRobustnessConfig = field(default_factory=EmbeddingRobustnessConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    output_dir: str = "outputs/eval"
    """Where tables, plots and the report card are written (then logged as artifacts)."""


@dataclass(frozen=True)
class EvaluateJobConfig:
    """The config of ``jobs/evaluate.py``."""

    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
