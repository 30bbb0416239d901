"""Recipes a sweep can run: each registers an adapter that says how one trial trains and what it reports.

An adapter (the :class:`SweepableRecipe` protocol) gives the sweep driver the recipe's config schema and default
config, the validation metrics a trial reports after every epoch (with the direction of each), and ``train_trial``,
which runs the chosen stages with the engine's ``fit`` inside a Tune trial. Adding a method to the sweeps means one
adapter module and one ``SWEEPABLE_RECIPES.register_lazy`` line here.

Importing this module imports no torch, ray or mlflow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from robustfm.registry import Registry

REPO_ROOT = Path(__file__).resolve().parents[2]
EPOCH_KEY = "epoch"
"""The counter every trial report carries (epochs done in the trial, over all its stages): ASHA's time axis."""


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
        self,
        cfg: Any,
        stages: Sequence[str],
        init_weights: str | None,
        run_name: str,
        run_callbacks: Sequence[Any],
        tracking_uri: str | None,
        parent_run_id: str | None,
    ) -> dict[str, Any]:
        """Train ``stages`` of ``cfg`` with ``fit`` (``run_callbacks`` into the TorchTrainer), reporting the
        validation metrics and :data:`EPOCH_KEY` after every epoch. Returns the run's final metrics."""
        ...


SWEEPABLE_RECIPES: Registry[SweepableRecipe] = Registry("sweepable recipe")
SWEEPABLE_RECIPES.register_lazy("cgclip", "robustfm.sweeps.cgclip:CGCLIP_SWEEP")
