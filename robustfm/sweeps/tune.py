"""Run a sweep: a search-space file + a recipe -> Ray Tune trials, each training with the engine, logged to MLflow.

    plan = plan_sweep("cgclip", "tune_spaces/cgclip_lambda_lr.yaml", overrides=["data.shards=data/coco"])
    init_ray(plan.base.ray)
    result = run_sweep(plan)        # rerun the same command after an interruption: it resumes

:func:`plan_sweep` does every check (space file, recipe config = space ``base_config`` <- space ``overrides`` <-
command-line overrides, every swept path and value, metric and mode) before Ray starts. :func:`run_sweep` then runs
Tune: each trial applies its sampled values to the config (``replace_path``) and runs the recipe's ``train_trial``,
whose TorchTrainer forwards the per-epoch validation reports to the trial (a ``TuneReportCallback`` that passes
only reports carrying the target metric, not the checkpoint reports). ASHA's time axis is the reported ``epoch``.

Everything of a sweep lives in ``<output_dir>/sweeps/<name>/``: Tune's experiment state, the trials' Train runs
(``train_runs/``) and the MLflow parent run id. If Tune's state is there, the sweep resumes (``Tuner.restore`` with
``resume_errored=True``): finished trials are kept, unfinished ones restart (their Train run resumes from its last
checkpoint), and MLflow logging continues in the same parent and child runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustfm.config import ConfigError, flatten, load_config, replace_path, to_dict
from robustfm.registry import import_target
from robustfm.sweeps.recipes import EPOCH_KEY, REPO_ROOT, SweepableRecipe
from robustfm.sweeps.space import SweepSpace, check_space_against, load_space

logger = logging.getLogger("robustfm.sweeps")
TRIAL_CPUS = 0.05
"""CPUs a trial function reserves: it only drives its TorchTrainer, whose workers reserve their own resources."""


def sweep_adapter(recipe: str) -> SweepableRecipe:
    """The sweep adapter a recipe registered next to itself (``RECIPES`` meta ``sweep``)."""
    from robustfm.recipes import RECIPES

    target = RECIPES.meta(recipe).get("sweep")  # an unknown recipe raises with a "did you mean"
    if target is None:
        raise ConfigError("recipe", f"recipe {recipe!r} registers no sweep adapter: it cannot be swept")
    return import_target(target) if isinstance(target, str) else target


@dataclass(frozen=True)
class SweepPlan:
    """A validated sweep, ready to run."""

    name: str
    recipe: str
    space: SweepSpace
    base: Any
    """The recipe config every trial starts from (its ``train.storage_path`` points into the sweep folder)."""
    stages: tuple[str, ...]
    total_epochs: int
    """Epochs of a trial that nothing stops (the sum over ``stages``): ASHA's ``max_t`` unless the space sets one."""
    experiment_dir: Path


@dataclass(frozen=True)
class SweepResult:
    """A finished sweep, or an interrupted one (then without a best trial: rerun the command to resume)."""

    experiment_dir: Path
    parent_run_id: str | None
    best_trial_id: str | None
    best_config: dict[str, Any]
    best_metric: float
    trials: list[dict[str, Any]]
    """Per trial: ``trial_id``, sampled values, ``epochs`` reported, last value of the metric, status."""
    interrupted: bool = False
    """Tune stopped before every trial ended (Ctrl-C / SIGINT): its state is saved and the same command resumes."""


def plan_sweep(
    recipe: str,
    space_path: str | Path,
    name: str | None = None,
    overrides: Sequence[str] = (),
    init_weights: str | None = None,
) -> SweepPlan:
    """Load and check everything a sweep needs; raises ``ConfigError`` naming the file and field.

    ``init_weights`` (the job's ``--init-weights``) replaces the space file's ``init_weights``; either is made
    absolute here, against the current directory, because trials run in directories of their own.
    """
    space = load_space(space_path)
    init_weights = init_weights if init_weights is not None else space.init_weights
    if init_weights is not None:
        space = dataclasses.replace(space, init_weights=str(Path(init_weights).resolve()))
    if space.recipe != recipe:
        raise ConfigError("recipe", f"{space_path} is a space for {space.recipe!r}, not {recipe!r}")
    adapter = sweep_adapter(recipe)
    if space.metric not in adapter.metrics:
        raise ConfigError("metric", f"{space.metric!r} is not reported by {recipe} (one of {sorted(adapter.metrics)})")
    if space.mode != adapter.metrics[space.metric]:
        raise ConfigError("mode", f"{space.metric} is better when {adapter.metrics[space.metric]}, not {space.mode}")
    base_path = REPO_ROOT / (space.base_config or adapter.default_config)
    if not base_path.is_file():
        raise ConfigError("base_config", f"{base_path} does not exist (paths are relative to the repository root)")
    base = load_config(adapter.config_class, base_path, [*space.overrides, *overrides])
    check_space_against(space, base)
    stages = space.stages or adapter.default_stages(base)
    adapter.check(base, stages, space.init_weights)
    name = name or Path(space_path).stem
    experiment_dir = Path(base.output_dir).resolve() / "sweeps" / name
    base = replace_path(base, "train.storage_path", str(experiment_dir / "train_runs"))
    total_epochs = sum(base.train.stages[s].epochs for s in stages)
    return SweepPlan(name, recipe, space, base, tuple(stages), total_epochs, experiment_dir)


@dataclass(frozen=True)
class TrialSetup:
    """What every trial function needs besides its sampled values (picklable)."""

    adapter: SweepableRecipe
    """The recipe's sweep adapter, resolved on the driver (a trial process has the registry's built-in recipes
    only)."""
    base: Any
    stages: tuple[str, ...]
    init_weights: str | None
    sweep_name: str
    metric: str


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """A Tune trial: the base config with the sampled values, trained by the recipe; results arrive per epoch."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochResults(TuneReportCallback):
        """Forwards the per-epoch validation reports only (checkpoint reports lack the metric Tune checks for)."""

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics and setup.metric in metrics[0]:
                super().after_report(run_context, metrics, None)

    cfg = setup.base
    for path, value in config.items():
        cfg = replace_path(cfg, path, value)
    trial_id = tune.get_context().get_trial_id()
    # A trial restarted after a failure (max_trial_failures) gets the same run name: its Train run resumes.
    run_name = f"{setup.sweep_name}-{trial_id}"
    setup.adapter.train_trial(cfg, setup.stages, setup.init_weights, run_name, [EpochResults()])


def run_sweep(plan: SweepPlan) -> SweepResult:
    """Run (or resume) the sweep on the Ray the caller started; print and log the best trial."""
    from ray import tune

    from robustfm.tracking import resolve_tracking_uri
    from robustfm.tracking.sweep import PARENT_ID_FILE, SweepMlflowCallback, reopen_run, start_parent_run

    space, adapter = plan.space, sweep_adapter(plan.recipe)
    base = adapter.prepare(plan.base)
    uri = resolve_tracking_uri(base.tracking)
    plan.experiment_dir.mkdir(parents=True, exist_ok=True)
    parent_file = plan.experiment_dir / PARENT_ID_FILE
    parent_run_id = None
    if uri is not None:
        if parent_file.is_file():
            parent_run_id = parent_file.read_text().strip()
            reopen_run(uri, parent_run_id)
        else:
            params = {**flatten({"space": to_dict(space)}), "stages": ",".join(plan.stages)}
            parent_run_id = start_parent_run(
                uri, base.tracking.experiment, plan.name, params, {"sweep": "true", "recipe": plan.recipe}
            )
            parent_file.write_text(parent_run_id)
    setup = TrialSetup(adapter, base, plan.stages, space.init_weights, plan.name, space.metric)
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"cpu": TRIAL_CPUS})
    if tune.Tuner.can_restore(str(plan.experiment_dir)):
        logger.info("resuming the sweep in %s", plan.experiment_dir)
        tuner = tune.Tuner.restore(str(plan.experiment_dir), trainable, resume_errored=True)
    else:
        callbacks = []
        if parent_run_id is not None:
            callbacks.append(
                SweepMlflowCallback(
                    uri, base.tracking.experiment, parent_run_id, plan.name, EPOCH_KEY, plan.total_epochs
                )
            )
        tuner = tune.Tuner(
            trainable,
            param_space={path: dist.to_tune() for path, dist in space.distributions().items()},
            tune_config=tune.TuneConfig(
                metric=space.metric,
                mode=space.mode,
                search_alg=_searcher(space),
                scheduler=_scheduler(space, plan.total_epochs),
                num_samples=space.num_samples,
                # the variant generator limits itself (see _searcher); Optuna is limited by Tune
                max_concurrent_trials=space.max_concurrent if space.searcher.type == "optuna_tpe" else None,
            ),
            run_config=tune.RunConfig(
                name=plan.experiment_dir.name,
                storage_path=str(plan.experiment_dir.parent),
                callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=space.max_trial_failures),
            ),
        )
    grid = tuner.fit()
    ended = grid.num_terminated + grid.num_errors
    if ended < plan.space.total_trials():
        return _interrupted(plan, grid, ended, uri, parent_run_id)
    return _summarize(plan, grid, uri, parent_run_id)


def _searcher(space: SweepSpace) -> Any:
    """Optuna TPE (TuneConfig's max_concurrent_trials limits it), or Tune's variant generator."""
    if space.searcher.type == "optuna_tpe":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=space.searcher.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # random and grid: grid(...) parameters are enumerated, the others sampled (seeded). A generator ignores
    # TuneConfig's max_concurrent_trials, so it gets the limit itself.
    return BasicVariantGenerator(random_state=space.searcher.seed, max_concurrent=space.max_concurrent)


def _scheduler(space: SweepSpace, total_epochs: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if space.scheduler.type == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr=EPOCH_KEY,
        max_t=space.scheduler.max_t or total_epochs,
        grace_period=space.scheduler.grace_period,
        reduction_factor=space.scheduler.reduction_factor,
    )


def _interrupted(plan: SweepPlan, grid: Any, ended: int, uri: str | None, parent_run_id: str | None) -> SweepResult:
    """Tune returned early (it catches SIGINT, saves its state and returns): no best trial is claimed, the runs of
    the sweep are marked KILLED (a resume reopens them), and the command to resume is printed."""
    if parent_run_id is not None:
        from robustfm.tracking.sweep import mark_interrupted

        mark_interrupted(uri, parent_run_id)
    total = plan.space.total_trials()
    print(
        f"\nSweep {plan.name} interrupted: {ended} of {total} trials ended; its state is saved in "
        f"{plan.experiment_dir}. Run the same command again to resume it."
    )
    return SweepResult(plan.experiment_dir, parent_run_id, None, {}, float("nan"), _trial_rows(plan, grid), True)


def _trial_rows(plan: SweepPlan, grid: Any) -> list[dict[str, Any]]:
    metric = plan.space.metric
    trials = []
    for result in grid:
        history = result.metrics_dataframe
        epochs = int(history[EPOCH_KEY].max()) if history is not None and EPOCH_KEY in history else 0
        trials.append(
            {
                "trial_id": (result.metrics or {}).get("trial_id", Path(result.path).name),
                **{k: v for k, v in (result.config or {}).items()},
                "epochs": epochs,
                metric: (result.metrics or {}).get(metric, float("nan")),
                "status": "ERROR" if result.error else ("STOPPED" if epochs < plan.total_epochs else "DONE"),
            }
        )
    return trials


def _summarize(plan: SweepPlan, grid: Any, uri: str | None, parent_run_id: str | None) -> SweepResult:
    metric, mode = plan.space.metric, plan.space.mode
    trials = _trial_rows(plan, grid)
    best = grid.get_best_result(metric=metric, mode=mode, scope="last")
    best_id = best.metrics["trial_id"]
    best_value = float(best.metrics[metric])
    summary = SweepResult(plan.experiment_dir, parent_run_id, best_id, dict(best.config), best_value, trials)
    (plan.experiment_dir / "best_trial.json").write_text(json.dumps(dataclasses.asdict(summary), indent=2, default=str))
    if parent_run_id is not None:
        from robustfm.tracking.sweep import finish_parent_run

        finish_parent_run(uri, parent_run_id, plan.name, best_id, best.config, metric, best_value)
    _print_summary(plan, summary)
    return summary


def _print_summary(plan: SweepPlan, result: SweepResult) -> None:
    metric = plan.space.metric
    print(f"\nSweep {plan.name}: {len(result.trials)} trials, {metric} ({plan.space.mode})")
    for trial in sorted(result.trials, key=lambda t: str(t["trial_id"])):
        values = ", ".join(
            f"{k}={trial[k]:.4g}" if isinstance(trial[k], float) else f"{k}={trial[k]}"
            for k in plan.space.space
            if k in trial
        )
        print(
            f"  {trial['trial_id']}: {values}  epochs={trial['epochs']} {metric}={trial[metric]:.4f} {trial['status']}"
        )
    print(f"best trial: {result.best_trial_id}  {metric}={result.best_metric:.4f}  {result.best_config}")
    print(f"  Tune experiment: {result.experiment_dir}")
    if result.parent_run_id:
        print(
            f"  MLflow parent run: {result.parent_run_id}  (compare: python jobs/compare.py --experiment "
            f"{plan.base.tracking.experiment} --parent {result.parent_run_id} --metric {metric})"
        )
