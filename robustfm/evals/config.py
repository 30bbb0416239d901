"""Configs of evaluation: where a suite's data comes from, how the actor pool is sized, and every suite's section.

Each suite owns its config class, defined in its module and registered with it (``SUITES`` meta ``config``); the
``suites`` field of :class:`EvalConfig` holds one section per registered suite (``eval.suites.zero_shot.templates``),
so adding a suite touches no file but its own. Every field is part of a result's protocol (see
:mod:`robustfm.evals.protocol`): two numbers are comparable only when the fields that shaped them are equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from robustfm.config.core import FrozenDict, RegistrySections, check
from robustfm.config.schema import RayConfig, TrackingConfig
from robustfm.evals import SUITES


@dataclass(frozen=True)
class EvalDataConfig:
    """The images a suite scores: Parquet shards (``robustfm.data`` format) or generated synthetic rows."""

    shards: str | None = None
    """Shard directory (local or ``s3://``) read with ``robustfm.data.open_shards``. None: synthetic data (below)."""
    split: str = "val"
    """Shard split to read."""
    max_samples: int | None = None
    """Score only the first N rows in id order (None: all). The protocol hashes exactly the ids used."""
    holdout_fraction: float = 0.0
    """Leave out every ``round(1/fraction)``-th row of the split (manifest order): the held-out validation rows of a
    recipe's training split, which a probe fitted on that split must not see. 0: keep every row."""
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
        check(0 <= self.holdout_fraction < 0.5, "holdout_fraction", self.holdout_fraction, "must be in [0, 0.5)")
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
    """The pool of Ray actors that score batches (:mod:`robustfm.evals.pool`); one pool serves every suite of a
    milestone."""

    min_actors: int = 1
    """Actors kept alive; the pool grows towards ``max_actors`` while work is queued (and the cluster has room)."""
    max_actors: int = 2
    """Upper bound of the pool; on an autoscaling cluster this is what the autoscaler may add nodes for."""
    num_cpus: float = 1.0
    """CPUs each actor reserves. Use a fraction when data-reading tasks must run beside the actors on few cores."""
    num_gpus: float = 0.0
    """GPUs each actor reserves (its model then runs on CUDA)."""
    resources: dict[str, float] = field(default_factory=FrozenDict)
    """Custom Ray resources each actor reserves (a resource the nodes meant for scoring declare, e.g.
    ``{scoring_node: 1}`` with ``ray start --resources '{"scoring_node": 4}'``): where the pool may place actors."""
    threads: int = 1
    """``torch.set_num_threads`` inside each actor: one thread per reserved CPU keeps actors from oversubscribing."""
    batch_size: int = 16
    """Rows per scored batch."""
    wait_for_min_actors_s: int = 600
    """Hold batches until ``min_actors`` actors have started, so that work spreads over the whole minimum pool; fails
    after this many seconds, naming the resources an actor asks for. 0: start with the first ready actor."""
    gradient_precision: Literal["fp32", "bf16"] = "fp32"
    """Suites whose scorers differentiate through the model (attacks, relevance maps): ``fp32``, or ``bf16``
    autocast around scoring (faster on GPUs; the weights stay fp32). Embedding-only suites ignore it."""

    def __post_init__(self) -> None:
        check(self.min_actors >= 1, "min_actors", self.min_actors, "must be >= 1")
        check(self.max_actors >= self.min_actors, "max_actors", self.max_actors, "must be >= min_actors")
        check(self.num_cpus >= 0, "num_cpus", self.num_cpus, "must be >= 0")
        check(self.num_gpus >= 0, "num_gpus", self.num_gpus, "must be >= 0")
        for key, value in self.resources.items():
            check(value > 0, f"resources.{key}", value, "must be positive")
        check(self.threads >= 1, "threads", self.threads, "must be >= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        check(self.wait_for_min_actors_s >= 0, "wait_for_min_actors_s", self.wait_for_min_actors_s, "must be >= 0")


class SuiteSettings(RegistrySections):
    """Suite name -> that suite's config section (the class registered with the suite in ``SUITES``)."""

    registry = SUITES


@dataclass(frozen=True)
class EvalConfig:
    """Everything that shapes evaluation numbers, shared by every suite."""

    seed: int = 0
    """Run seed of every per-sample draw (corruption choice, severity, noise, probe split)."""
    pool: ActorPoolConfig = field(default_factory=ActorPoolConfig)
    """The scoring actor pool."""
    suites: SuiteSettings = field(default_factory=SuiteSettings.build)
    """One section per registered suite (its data and knobs), e.g. ``suites.zero_shot.data.max_samples``."""
    output_dir: str = "outputs/eval"
    """Where tables, plots and the report card are written (then logged as artifacts)."""


@dataclass(frozen=True)
class EvaluateJobConfig:
    """The config of ``jobs/evaluate.py``."""

    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
