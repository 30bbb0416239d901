"""Config sections of the Ray Data stages: the corruption stage and the frozen-model actor pools.

Importing this module imports no torch or ray.
"""

from __future__ import annotations

from dataclasses import dataclass

from robustfm.config.core import check


@dataclass(frozen=True)
class CorruptionStageConfig:
    """Which corruption each CG-CLIP training row gets (drawn per sample and epoch from ``run_seed``)."""

    corruption_set: str = "seen"
    """A ``robustfm.corruptions.CORRUPTION_SETS`` name (``seen``, ``unseen``, ``imagenet_c``, ``all``) or a
    comma-separated list of corruption names."""
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    """Severities drawn uniformly per sample (CG-CLIP: 1..5)."""
    batch_size: int = 64
    """Rows per corruption task (tasks run on CPU)."""

    def __post_init__(self) -> None:
        check(bool(self.corruption_set), "corruption_set", self.corruption_set, "must name a set or corruptions")
        check(
            len(self.severities) > 0 and all(1 <= s <= 5 for s in self.severities),
            "severities",
            self.severities,
            "must be a non-empty list of severities among 1..5",
        )
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be at least 1")


@dataclass(frozen=True)
class FrozenStageConfig:
    """The actor pool of a frozen-model stage (a teacher's embeddings, VGG ground-truth maps): each actor loads
    the model once and then scores batches."""

    min_actors: int = 1
    """Fewest actors (``ray.data.ActorPoolStrategy(min_size=...)``); each holds one copy of the model."""
    max_actors: int = 1
    """Most actors; the pool grows up to this while the stage is the bottleneck."""
    num_cpus: float = 1.0
    """CPUs each actor reserves; torch in the actor uses ``max(1, int(num_cpus))`` threads."""
    num_gpus: float = 0.0
    """GPUs each actor reserves (0: the model runs on CPU; with any, on ``cuda``). Fractions share a GPU."""
    batch_size: int = 32
    """Rows per actor call."""

    def __post_init__(self) -> None:
        check(self.min_actors >= 1, "min_actors", self.min_actors, "must be at least 1")
        check(self.max_actors >= self.min_actors, "max_actors", self.max_actors, "must be >= min_actors")
        check(self.num_cpus > 0, "num_cpus", self.num_cpus, "must be > 0")
        check(self.num_gpus >= 0, "num_gpus", self.num_gpus, "must be >= 0")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be at least 1")

    @property
    def device(self) -> str:
        """Where the actors run the model: ``cuda`` when they reserve GPUs, else ``cpu``."""
        return "cuda" if self.num_gpus > 0 else "cpu"

    @property
    def threads(self) -> int:
        """torch threads per actor (one per reserved CPU keeps actors from oversubscribing the node)."""
        return max(1, int(self.num_cpus))
