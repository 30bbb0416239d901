"""Search-space files (``tune_spaces/*.yaml``): dotted config paths -> distributions, plus searcher and scheduler.

The file format, for every method::

    # python jobs/sweep.py --recipe cgclip --space tune_spaces/cgclip_lambda_lr.yaml
    recipe: cgclip                       # must match --recipe
    base_config: configs/cgclip/demo.yaml  # optional (default: the recipe's); relative to the repository root
    metric: val/auroc                    # one of the recipe's per-epoch validation metrics
    mode: max                            # max | min
    num_samples: 8                       # trials (with grid: repeats of the whole grid)
    max_concurrent: 2
    searcher: {type: optuna_tpe, seed: 0}   # random | grid | optuna_tpe
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2}   # asha | fifo
    overrides: [train.num_workers=1]     # fixed overrides applied to every trial
    stages: [tune]                       # optional: the stages a trial trains (default: the recipe's curriculum)
    init_weights: null                   # optional: saved task state every trial starts from
    space:
      train.stages.tune.loss_weights.corruption: loguniform(0.1, 10)
      train.stages.tune.lr.decoder: loguniform(1e-5, 1e-3)
      train.stages.adapt.epochs: choice([1, 2])

Distributions: ``uniform(a, b)``, ``loguniform(a, b)``, ``quniform(a, b, q)``, ``randint(a, b)``, ``choice([...])``
and ``grid([...])`` (every value is tried; only with the ``grid`` or ``random`` searcher). Each path is checked against
the recipe's config schema before anything starts, so a typo fails with the field named.

Every trial trains ``stages`` (in order, in one engine run) and reports the recipe's validation metrics after every
epoch, with ``epoch`` (epochs done in the trial, over all its stages) as ASHA's time axis. To sweep a late stage as
the paper does (lambda in Tune, after Adapt and Isolate), train the early stages once with the recipe's job and point
``init_weights`` at their saved weights (CG-CLIP: ``<output_dir>/<name>/stages/adapt-isolate/task.safetensors``).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from robustfm.config import ConfigError, FrozenDict, check, from_dict, replace_path

_CALL = re.compile(r"^\s*([a-z_]+)\s*\((.*)\)\s*$", re.DOTALL)
_ARITY = {"uniform": 2, "loguniform": 2, "quniform": 3, "randint": 2, "choice": 1, "grid": 1}


@dataclass(frozen=True)
class Distribution:
    """One parameter's distribution, parsed from text like ``loguniform(0.1, 10)``."""

    kind: str
    args: tuple[Any, ...]

    @classmethod
    def parse(cls, text: str, path: str) -> Distribution:
        """Parse ``kind(args)``; errors name the parameter path."""
        match = _CALL.match(str(text))
        if not match or match.group(1) not in _ARITY:
            raise ConfigError(
                f"space.{path}", f"expected one of {', '.join(f'{k}(...)' for k in _ARITY)}, got {text!r}"
            )
        kind, raw = match.groups()
        try:
            args = ast.literal_eval(f"({raw},)") if raw.strip() else ()
        except (ValueError, SyntaxError):
            raise ConfigError(f"space.{path}", f"arguments of {kind} must be literals, got {raw!r}") from None
        if len(args) != _ARITY[kind]:
            raise ConfigError(f"space.{path}", f"{kind} takes {_ARITY[kind]} arguments, got {len(args)}")
        if kind in ("choice", "grid"):
            check(
                isinstance(args[0], (list, tuple)) and len(args[0]) > 0,
                f"space.{path}",
                args[0],
                "needs a non-empty list",
            )
        else:
            low, high = args[0], args[1]
            check(low < high, f"space.{path}", args, "needs low < high")
            if kind == "loguniform":
                check(low > 0, f"space.{path}", args, "loguniform needs low > 0")
        return cls(kind, tuple(args))

    def values(self) -> list[Any]:
        """Values a config check tries: the bounds, or every listed value."""
        if self.kind in ("choice", "grid"):
            return list(self.args[0])
        low, high = self.args[0], self.args[1]
        return [low, high - 1] if self.kind == "randint" else [low, high]

    def to_tune(self) -> Any:
        """The Ray Tune search-space object."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.args[0]))
        if self.kind == "choice":
            return tune.choice(list(self.args[0]))
        return getattr(tune, self.kind)(*self.args)


@dataclass(frozen=True)
class SearcherSpec:
    """How trials are proposed."""

    type: Literal["random", "grid", "optuna_tpe"] = "random"
    """``random`` and ``grid`` use Tune's basic variant generator; ``optuna_tpe`` Optuna's TPE sampler."""
    seed: int = 0


@dataclass(frozen=True)
class SchedulerSpec:
    """How trials are stopped early."""

    type: Literal["asha", "fifo"] = "asha"
    """``asha`` stops trials whose metric lags at each rung; ``fifo`` runs every trial to the end."""
    grace_period: int = 1
    """Epochs every trial runs before it can be stopped."""
    reduction_factor: int = 2
    max_t: int | None = None
    """Longest a trial runs, in reported epochs (None: the recipe's total number of epochs)."""

    def __post_init__(self) -> None:
        check(self.grace_period >= 1, "grace_period", self.grace_period, "must be >= 1")
        check(self.reduction_factor >= 2, "reduction_factor", self.reduction_factor, "must be >= 2")


@dataclass(frozen=True)
class SweepSpace:
    """A parsed ``tune_spaces/*.yaml`` file."""

    recipe: str
    metric: str
    mode: Literal["max", "min"] = "max"
    num_samples: int = 4
    max_concurrent: int = 2
    base_config: str | None = None
    overrides: tuple[str, ...] = ()
    searcher: SearcherSpec = field(default_factory=SearcherSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    space: dict[str, str] = field(default_factory=FrozenDict)
    stages: tuple[str, ...] = ()
    """Stages of the recipe each trial trains, in order (empty: the recipe's own list, CG-CLIP's ``curriculum``)."""
    init_weights: str | None = None
    """A saved task state (safetensors) every trial starts from; None: the recipe's initial model."""
    max_trial_failures: int = 1
    """Times Tune restarts a trial that failed (its node was lost, its process died, its Train run gave up after
    ``train.max_failures``); the restarted trial's Train run resumes from its last checkpoint. 0: a failed trial
    ends in ERROR (rerunning the sweep command retries it)."""

    def __post_init__(self) -> None:
        check(self.num_samples >= 1, "num_samples", self.num_samples, "must be >= 1")
        check(self.max_trial_failures >= 0, "max_trial_failures", self.max_trial_failures, "must be >= 0")
        check(self.max_concurrent >= 1, "max_concurrent", self.max_concurrent, "must be >= 1")
        check(len(self.space) > 0, "space", dict(self.space), "needs at least one parameter")
        dists = self.distributions()
        has_grid = any(d.kind == "grid" for d in dists.values())
        check(
            not (has_grid and self.searcher.type == "optuna_tpe"),
            "searcher.type",
            self.searcher.type,
            "grid(...) parameters need the grid or random searcher",
        )

    def distributions(self) -> dict[str, Distribution]:
        """Parameter path -> parsed distribution."""
        return {path: Distribution.parse(text, path) for path, text in self.space.items()}

    def total_trials(self) -> int:
        """Trials of the whole sweep: ``num_samples`` times every combination of the ``grid(...)`` values."""
        combinations = 1
        for distribution in self.distributions().values():
            if distribution.kind == "grid":
                combinations *= len(distribution.values())
        return self.num_samples * combinations


def load_space(path: str | Path) -> SweepSpace:
    """Read and validate a search-space file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"search-space file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    try:
        return from_dict(SweepSpace, data)
    except ConfigError as err:
        raise ConfigError(err.field, f"{err.message} (in {path})") from None


def check_space_against(space: SweepSpace, base_config: Any) -> None:
    """Fail (naming the path) unless every swept path exists in the recipe's config and accepts the sampled values."""
    for path, dist in space.distributions().items():
        for value in dist.values():
            try:
                replace_path(base_config, path, value)
            except ConfigError as err:
                raise ConfigError(f"space.{path}", f"not a valid setting of the {space.recipe} config: {err}") from None
