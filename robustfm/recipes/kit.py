"""The recipe kit: what every method's recipe does the same way, so that a recipe reads as its method only.

- :class:`TaskBuilder` builds any registered method (``robustfm.methods.METHODS``) from the previous stage's weights,
  on every Ray Train worker (it pickles);
- :class:`RecipeRun` is the set-up: output folder, resolved config, tracker and the MLflow parent run;
- the stage loop, :func:`robustfm.recipes.curriculum.train_curriculum`, trains the stages from the previous ones'
  weights and measures a milestone after them;
- :func:`milestone` evaluates once and caches (``milestones/<name>.json``), so a rerun does not repeat it;
- :func:`export_with_wise_ft` writes the fine-tuned CLIP in open_clip layout and the WiSE-FT mixes, evaluates each
  and plots the recipe's headline metric against zero-shot retention;
- :func:`print_where` is the "where everything is" summary.

A recipe config provides ``name``, ``output_dir``, ``seed``, ``tracking``, ``model``, ``method``, ``train``,
``curriculum``, ``eval`` (:class:`~robustfm.recipes.kit_config.MilestoneEvalConfig`) and ``export``
(:class:`~robustfm.recipes.kit_config.ExportConfig`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustfm.config import ModelConfig, flatten, save_resolved_config

logger = logging.getLogger("robustfm.recipes")
ZERO_SHOT_TOP1 = "zero_shot/clean/top1"
"""The zero-shot accuracy a WiSE-FT mix's retention is measured with (what CLIP already knew)."""


@dataclass(frozen=True)
class TaskBuilder:
    """Builds a registered method's task, optionally from saved task weights (picklable: it travels to workers).

    Args:
        method: a ``robustfm.methods.METHODS`` name.
        model: the backbone to build.
        settings: the method's config section.
        init_weights: a task state saved by a previous stage (safetensors); None: the pretrained backbone.
    """

    method: str
    model: ModelConfig
    settings: Any
    init_weights: str | None = None

    def __call__(self) -> Any:
        from robustfm.methods import METHODS
        from robustfm.models.weights import load_weights

        task = METHODS.get(self.method)(self.model, self.settings)
        if self.init_weights is not None:
            load_weights(task, self.init_weights)
        return task

    def from_weights(self, path: str | Path | None) -> TaskBuilder:
        """The same builder starting from ``path`` (None: from the pretrained backbone)."""
        return dataclasses.replace(self, init_weights=None if path is None else str(path))

    def initial(self, seed: int) -> Any:
        """The task the first stage starts from. The engine seeds torch with the run seed before it builds its
        task; seeding the same way here makes a random-init backbone (the tiny demo model) the very network that
        training starts from, so the "pretrained" milestone and the WiSE-FT mixes compare against it."""
        import torch

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return self.from_weights(None)()


@dataclass
class RecipeRun:
    """A running recipe: its output folder, tracker and MLflow parent run. Start with :meth:`start`."""

    cfg: Any
    recipe: str
    out: Path
    tracking_uri: str | None
    tracker: Any
    parent: Any
    milestones: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def start(cls, cfg: Any, recipe: str, tags: Mapping[str, str] | None = None) -> RecipeRun:
        """Create ``<output_dir>/<name>``, save the resolved config, open the tracker and the parent run."""
        from robustfm.tracking import create_tracker, resolve_tracking_uri

        out = Path(cfg.output_dir).resolve() / cfg.name
        out.mkdir(parents=True, exist_ok=True)
        save_resolved_config(cfg, out)
        uri = resolve_tracking_uri(cfg.tracking)
        tracker = create_tracker(cfg.tracking, uri)
        parent = tracker.start_run(cfg.name, tags={"recipe": recipe, **dict(tags or {})})
        parent.log_params(flatten(cfg))
        parent.log_artifact(out / "resolved_config.yaml")
        return cls(cfg, recipe, out, uri, tracker, parent)

    def log_table(self, table: str, file_name: str) -> Path:
        """Write a markdown table next to the outputs and log it on the parent run."""
        path = self.out / file_name
        path.write_text(table)
        self.parent.log_text(table, file_name)
        return path

    def finish(self) -> None:
        """Write ``milestones.json``, end the parent run and close the tracker."""
        (self.out / "milestones.json").write_text(json.dumps(self.milestones, indent=2))
        self.parent.end()
        self.tracker.close()


def with_demo_data(cfg: Any) -> Any:
    """``cfg`` with ``data.shards`` set: the demo data set (scikit-image photos + generated images with COCO-style
    captions, written as shards through the real prepare path under ``<output_dir>/<name>/demo_data``) when the
    config names none. Built once; a rerun finds it."""
    if cfg.data.shards is not None:
        return cfg
    from robustfm.data.demo import write_demo_shards

    out = Path(cfg.output_dir).resolve() / cfg.name / "demo_data"
    shards = write_demo_shards(out, image_size=max(64, cfg.data.image_size), seed=cfg.seed)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=str(shards)))


def training_source(
    data: Any,
    seed: int,
    stages: Sequence[Any],
    *,
    batch_size: int | None = None,
    augment: bool = True,
    rows: Sequence[int] | None = None,
    columns: Sequence[str] | None = None,
) -> Any:
    """The training split of ``data`` (an :class:`~robustfm.recipes.kit_config.ImageShardsConfig`) minus the part
    :func:`heldout_source` reads, shuffled every epoch, with ``stages`` applied. ``augment``: seeded random-resized
    crop (``data.crop_scale``) + flip, else the eval transform. ``batch_size`` overrides ``data.batch_size``;
    ``rows`` keeps only those rows of the split, ``columns`` reads only those (see ``ShardBatchSource``)."""
    from robustfm.data import ShardBatchSource

    return ShardBatchSource(
        data.shards,
        data.train_split,
        data.image_size,
        batch_size or data.batch_size,
        train=augment,
        shuffle=True,
        seed=seed,
        stages=stages,
        crop_scale=data.crop_scale,
        endpoint_url=data.s3_endpoint_url,
        holdout_fraction=data.holdout_fraction,
        holdout_role="exclude",
        rows=rows,
        columns=columns,
    )


def heldout_source(
    data: Any,
    seed: int,
    stages: Sequence[Any],
    max_batch: int = 64,
    *,
    rows: Sequence[int] | None = None,
    columns: Sequence[str] | None = None,
) -> Any:
    """The held-out part of ``data.train_split`` (every ``round(1 / data.holdout_fraction)``-th image, which training
    excludes), eval transform, fixed order, ``stages`` applied: the validation set of a sweep. Batches of at most
    ``max_batch`` images; a smaller split is one batch, so no held-out image is dropped. ``rows`` and ``columns`` as
    in :func:`training_source`."""
    from robustfm.data import ShardBatchSource

    def source(batch_size: int) -> Any:
        return ShardBatchSource(
            data.shards,
            data.train_split,
            data.image_size,
            batch_size,
            train=False,
            seed=seed,
            stages=stages,
            endpoint_url=data.s3_endpoint_url,
            holdout_fraction=data.holdout_fraction,
            holdout_role="only",
            rows=rows,
            columns=columns,
        )

    return source(max(1, min(max_batch, source(1).num_rows)))


@dataclass(frozen=True)
class MilestoneResult:
    """What a recipe's milestone evaluation returns: metrics and the files to keep as artifacts.

    Attributes:
        metrics: flat ``{key: value}``.
        artifacts: ``(file, artifact folder)`` pairs, logged on the milestone run and on the parent run.
    """

    metrics: dict[str, float]
    artifacts: tuple[tuple[str, str], ...] = ()


Evaluation = Callable[[Any, str], MilestoneResult]
"""``evaluate(tracker, milestone_run_id)`` -> the milestone's metrics and artifacts (suites log nested runs)."""


def milestone(run: RecipeRun, name: str, evaluate: Evaluation) -> dict[str, float]:
    """Evaluate milestone ``name`` with ``evaluate`` once; cached in ``milestones/<name>.json`` for reruns with the
    same evaluation settings (:mod:`robustfm.recipes.milestone_cache`).

    With ``eval.enabled`` false nothing is evaluated (an empty result, cached); a milestone that ``eval.milestones``
    leaves out is left out of ``run.milestones`` (and its tables), not cached. The parent run gets every milestone's
    metrics (prefixed ``<name>/``) and artifacts, also those an earlier run with a shared curriculum prefix computed.
    """
    from robustfm.recipes.milestone_cache import evaluation_fingerprint, read_cached, write_cached

    cached, fingerprint = run.out / "milestones" / f"{name}.json", evaluation_fingerprint(run.cfg)
    record = read_cached(cached, fingerprint)
    if record is None:
        if run.cfg.eval.enabled and not run.cfg.evaluates(name):
            logger.info("milestone %s: not evaluated (eval.milestones: %s)", name, ", ".join(run.cfg.eval.milestones))
            return {}
        record = _measure(run, name, evaluate) if run.cfg.eval.enabled else {"metrics": {}, "artifacts": []}
        write_cached(cached, record, fingerprint)
    run.parent.log_metrics({f"{name}/{key}": value for key, value in record["metrics"].items()})
    for path, folder in record["artifacts"]:
        if Path(path).is_file():
            run.parent.log_artifact(path, folder)
    run.milestones[name] = dict(record["metrics"])
    return run.milestones[name]


def _measure(run: RecipeRun, name: str, evaluate: Evaluation) -> dict[str, Any]:
    """Run the milestone's evaluation under a nested MLflow run; its record (metrics, artifacts) for the cache."""
    from robustfm.evals.pool import scoring_session

    tracked = run.tracker.start_run(f"milestone-{name}", parent_run_id=run.parent.run_id, tags={"milestone": name})
    with scoring_session():  # one actor pool for all the milestone's suites, stopped before training resumes
        result = evaluate(run.tracker, tracked.run_id)
    tracked.log_metrics(result.metrics)
    for path, folder in result.artifacts:
        tracked.log_artifact(path, folder)
    tracked.end()
    return {"metrics": result.metrics, "artifacts": [list(a) for a in result.artifacts]}


def milestone_name(curriculum: Sequence[str], index: int) -> str:
    """A milestone is named by the stages behind it (``adapt-isolate``): ablations that share a prefix of the
    curriculum share its training and evaluation within one output folder."""
    return "-".join(curriculum[: index + 1])


@dataclass(frozen=True)
class ExportResult:
    """Where the export went: the fine-tuned model, the WiSE-FT mixes and their trade-off table and plot."""

    model_path: Path
    wise_ft_paths: dict[float, Path]
    tradeoff_plot: Path | None = None


def export_with_wise_ft(
    run: RecipeRun,
    model: Any,
    pretrained_state: Mapping[str, Any],
    suites: Sequence[str],
    eval_settings: Any,
    headline: str,
    retention: str = ZERO_SHOT_TOP1,
) -> ExportResult:
    """Export ``model`` (a ClipModel, or a timm classifier) and, for each ``export.wise_ft_alphas``, a mix of its
    weights with the pretrained ones (a CLIP's image tower; a classifier's whole network); each mix is evaluated with
    ``suites`` and ``headline`` is plotted against the retention of ``retention`` (zero-shot accuracy for CLIP):
    fine-tuning can erase what the model knew, WiSE-FT trades it back."""
    from robustfm.models.export import export_model, export_wise_ft

    cfg = run.cfg
    export_dir = run.out / "export" / "-".join(cfg.curriculum)
    metadata = {"model_name": cfg.model.name, "recipe": run.recipe, "curriculum": ",".join(cfg.curriculum)}
    path = export_model(model, export_dir / "model.safetensors", metadata=metadata)
    run.parent.log_artifact(path, "export")
    if not cfg.export.wise_ft_alphas:
        return ExportResult(path, {})
    mixes = export_wise_ft(model, pretrained_state, export_dir / "wise_ft", cfg.export.wise_ft_alphas)
    if not cfg.eval.enabled:
        return ExportResult(path, mixes)
    from robustfm.evals import evaluate_model
    from robustfm.evals.pool import scoring_session
    from robustfm.recipes.milestones import markdown_table, tradeoff_plot

    base_top1 = run.milestones.get("pretrained", {}).get(retention)
    kept = "zero_shot_top1" if retention == ZERO_SHOT_TOP1 else retention.replace("/", "_")
    kept_share = "zero_shot_retention" if retention == ZERO_SHOT_TOP1 else f"{kept}_retention"
    rows = []
    with scoring_session():  # the mixes are scored by the same actors
        for alpha, mix in mixes.items():
            tags = {"alpha": alpha}
            tracked = run.tracker.start_run(f"wise-ft-{alpha:g}", parent_run_id=run.parent.run_id, tags=tags)
            mix_ref = f"{cfg.model.name}@{mix}"
            metrics = evaluate_model(mix_ref, list(suites), eval_settings, run.tracker, tracked.run_id)
            tracked.log_metrics(metrics)
            tracked.end()
            top1 = metrics.get(retention, float("nan"))
            rows.append(
                {
                    "alpha": alpha,
                    headline: metrics.get(headline, float("nan")),
                    kept: top1,
                    kept_share: top1 / base_top1 if base_top1 else float("nan"),
                }
            )
    title = f"WiSE-FT: {headline} vs retention of {retention}"
    png = tradeoff_plot(rows, kept_share, headline, run.out / "wise_ft_tradeoff.png", title)
    run.parent.log_artifact(png, "wise_ft")
    run.log_table(markdown_table(rows), "wise_ft_tradeoff.md")
    return ExportResult(path, mixes, png)


def print_where(title: str, run: RecipeRun, table: str, places: Mapping[str, Any]) -> None:
    """The end of a recipe: its table and where everything is (folders, files, the MLflow command)."""
    print(f"\n{title} finished.\n")
    print(table)
    for what, where in places.items():
        print(f"  {what}: {where}")
    uri, experiment = run.tracking_uri, run.cfg.tracking.experiment
    if uri and uri.startswith("sqlite:"):
        print(f"  MLflow: mlflow ui --backend-store-uri {uri}   (experiment '{experiment}')")
    elif uri:
        print(f"  MLflow: {uri} (experiment '{experiment}')")
