"""``AttackConfig``: the threat model and the attack's settings. Importing this imports no torch."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from robustfm.config.core import check, from_dict, to_dict
from robustfm.registry import did_you_mean

NORMS = ("linf", "l2")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class AttackConfig:
    """One attack, on [0,1] pixels (models normalize inside). Used by both :func:`~robustfm.attacks.pgd` and
    :func:`~robustfm.attacks.apgd`; fields that only one of them reads say so.

    Example: RobustVLM's training attack is ``AttackConfig(eps=4/255, steps=10, objective="embedding_l2")`` with
    ``pgd``; paper 003's 2AFC evaluation is ``AttackConfig(eps=4/255, steps=100, objective="two_afc")`` with ``apgd``.
    """

    norm: Literal["linf", "l2"] = "linf"
    """Threat model: ``linf`` (max |delta| <= eps per pixel) or ``l2`` (||delta||_2 <= eps per image)."""
    eps: float = 4 / 255
    """Radius in [0,1] pixel units (Linf 4/255 = 0.0157; L2 3.0 in paper 003), not /255 units."""
    steps: int = 10
    """Gradient evaluations per restart (APGD: iterations; the start point is evaluated once more)."""
    restarts: int = 1
    """Independent random starts (APGD); each row keeps its best loss and any success over restarts. PGD runs one."""
    random_start: bool = True
    """Start from a random point of the ball (Linf: U(-eps, eps) per pixel; L2: eps * g/||g||_2, g ~ N(0, I)),
    clamped into [0,1]; false: start at x."""
    objective: str = "ce"
    """A ``robustfm.attacks.OBJECTIVES`` name: the per-sample loss that is maximized (``ce``, ``embedding_l2``,
    ``two_afc``, ``cosine_away``, ``targeted_set``, ``inversion``)."""
    step_size: float = 1 / 255
    """PGD only: the fixed step (pixel units); RobustVLM trains with 1/255. APGD starts at 2*eps and halves it."""
    seed: int = 0
    """Seed of the attack's own ``torch.Generator`` when the caller passes none (the global RNG is never used)."""
    early_stop: bool = False
    """APGD only: stop a restart (and skip the remaining ones) once every row has succeeded. Checked after every
    iteration, which costs one host sync each; keep it off in benchmarks. Needs an objective with success."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """The model forward/backward: ``fp32`` (autocast disabled, also inside an outer bf16 autocast region) or
    ``bf16`` autocast. The perturbation, projection and loss are fp32 either way."""

    def __post_init__(self) -> None:
        from robustfm.attacks.registry import OBJECTIVES  # lazy entries: imports no torch

        check(self.norm in NORMS, "norm", self.norm, f"must be one of {NORMS}{did_you_mean(str(self.norm), NORMS)}")
        check(_is_number(self.eps) and math.isfinite(self.eps) and self.eps > 0, "eps", self.eps, "must be > 0")
        check(_is_int(self.steps) and self.steps >= 1, "steps", self.steps, "must be an integer >= 1")
        check(_is_int(self.restarts) and self.restarts >= 1, "restarts", self.restarts, "must be an integer >= 1")
        check(isinstance(self.random_start, bool), "random_start", self.random_start, "must be true or false")
        check(
            self.restarts == 1 or self.random_start,
            "restarts",
            self.restarts,
            "must be 1 when random_start is false (every restart would repeat the same deterministic run)",
        )
        check(
            isinstance(self.objective, str) and self.objective in OBJECTIVES,
            "objective",
            self.objective,
            f"must be one of {OBJECTIVES.names()}{did_you_mean(str(self.objective), OBJECTIVES.names())}",
        )
        check(
            _is_number(self.step_size) and math.isfinite(self.step_size) and self.step_size > 0,
            "step_size",
            self.step_size,
            "must be > 0",
        )
        check(_is_int(self.seed) and 0 <= self.seed < 2**63, "seed", self.seed, "must be an integer in [0, 2**63)")
        check(isinstance(self.early_stop, bool), "early_stop", self.early_stop, "must be true or false")
        check(
            not self.early_stop or OBJECTIVES.meta(self.objective)["has_success"],
            "early_stop",
            self.early_stop,
            f"needs an objective that defines success, and {self.objective!r} does not",
        )
        check(
            self.precision in PRECISIONS,
            "precision",
            self.precision,
            f"must be one of {PRECISIONS}{did_you_mean(str(self.precision), PRECISIONS)}",
        )

    def record(self) -> dict[str, Any]:
        """The config as plain JSON-serializable data, for a protocol record (round-trips with :meth:`from_record`)."""
        return to_dict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> AttackConfig:
        """Rebuild a config from :meth:`record` output (or YAML); unknown keys and bad types raise naming the field."""
        return from_dict(cls, record)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
