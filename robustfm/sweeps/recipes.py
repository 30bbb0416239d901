"""What a sweep needs from a recipe, and the adapter every kit-based recipe uses.

A recipe registers its adapter next to itself (``RECIPES`` meta ``sweep``, see :mod:`robustfm.recipes`): the config
schema and default config, the validation metrics a trial reports after every epoch (with the direction of each),
and ``train_trial``, which runs the chosen stages with the engine's ``fit`` inside a Tune trial. For recipes built on
the kit, :class:`RecipeSweep` is that adapter; the recipe supplies its task builder, its batches and an
:class:`EpochValidation` that measures the current weights.

Trials log nothing to MLflow themselves: the sweep driver writes the parent and child runs (one writing path,
whatever the tracking URI's scheme; parallel trials never write one SQLite file).

Importing this module imports no torch, ray or mlflow.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from robustfm.config import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
EPOCH_KEY = "epoch"
"""The counter every trial report carries (epochs done in the trial, over all its stages): ASHA's time axis."""
DIVERGED = "val/diverged"
TRAIN_LOSS = "train/loss"


class SweepableRecipe(Protocol):
    """What the sweep driver needs from a recipe."""

    config_class: type
    """The recipe's config schema (a frozen dataclass)."""
    default_config: Path
    """The config a space without ``base_config`` starts from."""
    metrics: Mapping[str, str]
    """Validation metrics reported after every epoch -> ``max`` or ``min`` (which way is better)."""
    diverged_values: Mapping[str, float]
    """What each metric reads when the trial diverged (non-finite loss or weights): the worst value, finite, so
    that schedulers stop the trial and searchers learn from it."""

    def default_stages(self, cfg: Any) -> tuple[str, ...]:
        """The stages a trial trains when the space names none."""
        ...

    def check(self, cfg: Any, stages: Sequence[str], init_weights: str | None) -> None:
        """Raise ``ConfigError`` (naming the field) unless ``cfg`` can be swept; runs before Ray starts."""
        ...

    def prepare(self, cfg: Any) -> Any:
        """Fill in what every trial shares (e.g. build the demo data set once); runs on the driver once Ray is up.
        Returns the config the trials start from."""
        ...

    def train_trial(
        self, cfg: Any, stages: Sequence[str], init_weights: str | None, run_name: str, run_callbacks: Sequence[Any]
    ) -> dict[str, Any]:
        """Train ``stages`` of ``cfg`` with ``fit`` (``run_callbacks`` into the TorchTrainer), reporting the
        validation metrics and :data:`EPOCH_KEY` after every epoch. Returns the run's final metrics."""
        ...


@dataclass
class EpochValidation:
    """The engine's ``on_epoch_end`` hook of a swept recipe (picklable; runs on rank 0 of the trial's Train run).

    It rebuilds the task once per process, loads the reported weights and calls :meth:`measure`; a trial whose loss,
    weights or metrics are no longer finite (a diverging learning rate) reports ``val/diverged = 1`` and the worst
    value of every metric, so ASHA stops it and Optuna learns from it, instead of Tune crashing on NaN.

    Args:
        builder: a :class:`robustfm.recipes.kit.TaskBuilder` (weights are loaded into what it builds).
        diverged_values: the adapter's worst values.
        source: the held-out batches (:func:`robustfm.recipes.kit.heldout_source`), read once per process.
    """

    builder: Any
    diverged_values: Mapping[str, float]
    source: Any = None
    _task: Any = field(default=None, repr=False)
    _held_out: Any = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_task": None, "_held_out": None}  # rebuilt where the hook runs

    def held_out(self, *columns: str) -> list[Any]:
        """``columns`` of every held-out image as float tensors (read from :attr:`source` on the first call)."""
        import torch

        if self._held_out is None:
            batches = list(self.source.batches(epoch=0, rank=0, world_size=1, skip_batches=0))
            if not batches:
                raise ValueError("the validation split holds no full batch: raise data.holdout_fraction")
            tensors = [key for key, value in batches[0].items() if isinstance(value, torch.Tensor)]
            self._held_out = {key: torch.cat([b[key] for b in batches]).float() for key in tensors}
        return [self._held_out[column] for column in columns]

    def measure(self, task: Any) -> dict[str, float]:
        """Validation metrics of ``task`` (eval mode, current weights loaded, no gradients)."""
        raise NotImplementedError

    def __call__(self, stage: str, epoch: int, model_state: dict[str, Any], last: dict[str, Any]) -> dict[str, float]:
        import torch

        loss = float(last.get("loss/total", 0.0))
        finite = all(bool(torch.isfinite(t).all()) for t in model_state.values() if t.is_floating_point())
        if not (math.isfinite(loss) and finite):
            return self._diverged(loss)
        if self._task is None:
            self._task = self.builder.from_weights(None)().eval()
        self._task.load_state_dict(model_state)
        with torch.no_grad():
            metrics = self.measure(self._task)
        if not all(math.isfinite(v) for v in metrics.values()):
            return self._diverged(loss)
        return {**metrics, DIVERGED: 0.0, TRAIN_LOSS: loss}

    def _diverged(self, loss: float) -> dict[str, float]:
        return {**self.diverged_values, DIVERGED: 1.0, TRAIN_LOSS: loss if math.isfinite(loss) else 1e30}


@dataclass(frozen=True)
class RecipeSweep:
    """The sweep adapter of a recipe built on the kit (:class:`SweepableRecipe`).

    Args:
        config_class, default_config, metrics, diverged_values: see :class:`SweepableRecipe`.
        builder: ``builder(cfg, init_weights)`` -> the trial's :class:`~robustfm.recipes.kit.TaskBuilder`.
        batches: ``batches(cfg, stages)`` -> the engine's batch source for a trial training ``stages``.
        validation: ``validation(cfg, builder)`` -> the :class:`EpochValidation` hook.
        problems: ``problems(cfg)`` -> ``field: message`` lines of inputs ``cfg`` lacks (shards, splits, weights),
            checked before Ray starts, with the held-out split every trial validates on.
        resolve_data: ``resolve_data(cfg)`` -> ``cfg`` with every input in place (e.g. the demo data set built once
            on the driver for every trial).
    """

    config_class: type
    default_config: Path
    metrics: Mapping[str, str]
    diverged_values: Mapping[str, float]
    builder: Callable[[Any, str | None], Any]
    batches: Callable[[Any, Sequence[str]], Any]
    validation: Callable[[Any, Any], EpochValidation]
    problems: Callable[[Any], list[str]]
    resolve_data: Callable[[Any], Any]

    def default_stages(self, cfg: Any) -> tuple[str, ...]:
        return tuple(cfg.curriculum)

    def check(self, cfg: Any, stages: Sequence[str], init_weights: str | None) -> None:
        for stage in stages:
            if stage not in cfg.train.stages:
                raise ConfigError("stages", f"{stage!r} is not a stage of train.stages ({', '.join(cfg.train.stages)})")
        if cfg.train.launcher != "ray":
            raise ConfigError("train.launcher", "a sweep trial reports through Ray Train: it must be 'ray'")
        if init_weights is not None and not Path(init_weights).is_file():
            raise ConfigError("init_weights", f"weights file {init_weights!r} does not exist")
        if cfg.data.holdout_fraction <= 0:
            raise ConfigError("data.holdout_fraction", "a sweep validates on the held-out split: it must be > 0")
        problems = self.problems(cfg)
        if problems:
            raise ConfigError("", "; ".join(problems))

    def prepare(self, cfg: Any) -> Any:
        return self.resolve_data(cfg)

    def train_trial(
        self, cfg: Any, stages: Sequence[str], init_weights: str | None, run_name: str, run_callbacks: Sequence[Any]
    ) -> dict[str, Any]:
        from robustfm.train import fit

        builder = self.builder(cfg, init_weights)
        train_cfg = dataclasses.replace(cfg.train, stages={s: cfg.train.stages[s] for s in stages}, seed=cfg.seed)
        result = fit(
            train_cfg,
            builder,
            self.batches(cfg, stages),
            tracking_uri=None,  # the sweep driver is the only MLflow writer (see the module docstring)
            run_name=run_name,
            on_epoch_end=self.validation(cfg, builder),
            run_callbacks=run_callbacks,
        )
        return result.metrics
