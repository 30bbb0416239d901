"""Running suites: data set -> scoring actor pool -> scored rows on the driver -> aggregation -> protocol, artifacts
and MLflow.

:func:`run_suite` runs one registered suite on one model; :func:`evaluate_model` runs several and returns their
metrics as one flat dict — it is what a training recipe calls at the end of a stage. Both log one MLflow run per suite
(nested under ``parent_run_id`` when given) holding the metrics, the protocol (as params and ``protocol.json``), the
table (``table.csv`` / ``table.json``) and the plots (``plots/*.png``).

Faults: the pool restarts a scoring actor that dies (its process exits, its node goes away) and scores the blocks
it held again (:mod:`robustfm.evals.pool`), so the run completes with exact counts; ``tests/ray/test_evals_suites.py``
kills an actor on its first batch to prove it, ``tests/ray/test_multinode.py`` removes a node mid-suite.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from robustfm.evals.actors import STATUS_OK
from robustfm.evals.config import EvalConfig
from robustfm.evals.metrics import Direction
from robustfm.evals.model_ref import ModelRef, parse_model_ref
from robustfm.evals.protocol import build_protocol
from robustfm.evals.suite import Plot, Suite
from robustfm.tracking.base import NullTracker

logger = logging.getLogger("robustfm")


@dataclass
class SuiteResult:
    """One suite's result for one model.

    Attributes:
        suite: suite name.
        model: the model's label.
        metrics: ``{key: value}`` (keys without the suite prefix).
        directions: ``{key: "higher" | "lower"}`` for every metric.
        table: the table artifact rows.
        plots: figure data (rendered to ``artifact_dir/plots``).
        protocol: see :mod:`robustfm.evals.protocol`.
        counts: ``scored`` images, ``skipped`` images (with ``skipped/<reason>``), ``rows`` scored rows.
        artifact_dir: where metrics.json, protocol.json, table.csv/json and plots/ were written.
        run_id: the MLflow run of this suite (None without a tracker).
        seconds: wall time of the Ray part (scoring) and of the whole suite.
        actors: how many actors of the pool scored rows (not part of the protocol: it says how work spread).
        params: the resolved scorer parameters.
        stage: the training stage this evaluation followed, if any.
        rows: every scored row as columns (only with ``keep_rows``).
    """

    suite: str
    model: str
    metrics: dict[str, float]
    directions: dict[str, Direction]
    table: list[dict[str, Any]]
    plots: list[Plot]
    protocol: dict[str, Any]
    counts: dict[str, int]
    artifact_dir: Path
    run_id: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    actors: int = 0
    stage: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, np.ndarray] | None = None
    images: dict[str, np.ndarray] = field(default_factory=dict)


def _suite(name: str, cfg: EvalConfig) -> Suite:
    from robustfm.evals import SUITES

    return SUITES.get(name)(cfg)


def score_rows(
    suite: Suite, model_ref: ModelRef, cfg: EvalConfig, *, crash_once_marker: str | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Score the suite's data on the actor pool (the session's, see :mod:`robustfm.evals.pool`); return all output
    rows as columns (sorted) and the scorer params."""
    from robustfm.evals.data import load_eval_dataset
    from robustfm.evals.pool import make_room_for_reading, new_spec, pool_for, read_blocks

    pool = cfg.pool
    make_room_for_reading()  # reading the shards (their footers too) needs a CPU that a session's actors may hold
    # A few blocks per actor, so that the whole pool works even when the data is one shard file.
    reader = f"suite {suite.name!r}"
    rows = load_eval_dataset(suite.data, cfg.seed, suite.columns, reader, 4 * pool.max_actors, pool.batch_size)
    dataset = suite.shape_dataset(rows)
    params = suite.scorer_params(dataset)
    blocks = read_blocks(dataset)
    spec = new_spec(suite.scorer, model_ref, params, cfg.seed, crash_once_marker, pool.gradient_precision)
    with pool_for(pool) as actors:
        batches = actors.score(blocks, spec)
    batches = [batch for batch in batches if len(batch["id"])]
    if not batches:
        raise RuntimeError(f"suite {suite.name!r}: the data set {suite.data} has no rows")
    columns = {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}
    # Output order depends on which actor finished first: sort, so aggregation sees the same rows in the same order.
    keys = [np.asarray(columns[k]).astype(str) for k in reversed(suite.sort_keys) if k in columns]
    order = np.lexsort(keys)
    return {key: np.asarray(values)[order] for key, values in columns.items()}, params


def run_suite(
    name: str,
    model: ModelRef | str,
    cfg: EvalConfig,
    tracker: Any = None,
    parent_run_id: str | None = None,
    *,
    stage: str | None = None,
    keep_rows: bool = False,
    crash_once_marker: str | None = None,
) -> SuiteResult:
    """Run one registered suite on one model and log it.

    Args:
        name: a name of ``robustfm.evals.SUITES``.
        model: a :class:`ModelRef` or a ``--model`` string (see :mod:`robustfm.evals.model_ref`).
        cfg: evaluation config.
        tracker: a ``robustfm.tracking.Tracker`` (None: nothing is logged, artifacts are still written).
        parent_run_id: nest this suite's run under it.
        stage: a training stage name when a recipe evaluates after each stage: the run is ``eval/<stage>/<suite>``
            (tagged ``stage``) and artifacts go to ``<output_dir>/<model>/<stage>/<suite>``.
        keep_rows: keep every scored row (columns, sorted) on ``result.rows`` for inspection.
        crash_once_marker: fault injection, see :class:`robustfm.evals.actors.ScoringActor`.
    """
    model_ref = parse_model_ref(model) if isinstance(model, str) else model
    suite = _suite(name, cfg)
    started = time.perf_counter()
    rows, params = score_rows(suite, model_ref, cfg, crash_once_marker=crash_once_marker)
    scored_s = time.perf_counter() - started
    status = np.asarray(rows["status"]).astype(str)
    ids = np.asarray(rows["id"]).astype(str)
    ok = status == STATUS_OK
    counts = {"scored": len(np.unique(ids[ok])), "skipped": len(np.unique(ids[~ok])), "rows": int(ok.sum())}
    for reason in sorted(set(status[~ok])):
        counts[f"skipped/{reason}"] = len(np.unique(ids[status == reason]))
    if counts["scored"] == 0:
        raise RuntimeError(f"suite {name!r}: no sample could be scored ({counts['skipped']} skipped: {counts})")
    output = suite.aggregate({key: values[ok] for key, values in rows.items()}, params)
    protocol = build_protocol(
        suite=name,
        version=suite.version,
        model=model_ref.describe(),
        data=suite.data,
        sample_ids=list(ids),
        image_size=None,
        seed=cfg.seed,
        params=suite.protocol_params(params),
        metric_specs=suite.metric_specs,
        counts=counts,
    )
    result = SuiteResult(
        suite=name,
        model=model_ref.label,
        metrics=output.metrics.values,
        directions=output.metrics.directions(),
        table=output.table,
        plots=output.plots,
        protocol=protocol,
        counts=counts,
        artifact_dir=Path(cfg.output_dir) / safe_name(model_ref.label) / (stage or "") / name,
        params=params,
        stage=stage,
        rows=rows if keep_rows else None,
        images=output.images,
    )
    write_artifacts(result)
    result.run_id = log_result(result, tracker or NullTracker(), parent_run_id) or None
    result.seconds = {"scoring": scored_s, "total": time.perf_counter() - started}
    result.actors = len(np.unique(np.asarray(rows["actor_pid"])))
    return result


def evaluate_model(*args: Any, **kwargs: Any) -> dict[str, float]:
    """:func:`run_suites`, with the metrics as one flat dict ``{"<suite>/<metric>": value}``: the hook a recipe calls
    after a stage.

    Takes :func:`run_suites`' arguments: ``(model_or_ref, suites, cfg, tracker=None, parent_run_id=None, *,
    stage=None)``; ``model_or_ref`` may be a :class:`ModelRef`, a ``--model`` string or an ``nn.Module`` (copied to
    Ray's object store), ``stage`` names the runs ``eval/<stage>/<suite>``.
    """
    return flat_metrics(run_suites(*args, **kwargs))


def flat_metrics(results: Sequence[SuiteResult]) -> dict[str, float]:
    """``{"<suite>/<metric>": value}`` over ``results``."""
    return {f"{r.suite}/{key}": value for r in results for key, value in r.metrics.items()}


def run_suites(
    model_or_ref: ModelRef | str | Any,
    suites: Sequence[str],
    cfg: EvalConfig,
    tracker: Any = None,
    parent_run_id: str | None = None,
    *,
    stage: str | None = None,
) -> list[SuiteResult]:
    """:func:`run_suite` for each of ``suites`` (``["all"]``: every registered suite), in order.

    Args:
        model_or_ref: a :class:`ModelRef`, a ``--model`` string, or an ``nn.Module`` (copied to Ray's object store).
        stage: the stage just finished (names the runs ``eval/<stage>/<suite>``).
    """
    from robustfm.evals import SUITES
    from robustfm.evals.pool import scoring_session

    if isinstance(model_or_ref, ModelRef):
        model_ref = model_or_ref
    elif isinstance(model_or_ref, str):
        model_ref = parse_model_ref(model_or_ref)
    else:
        model_ref = ModelRef.from_module(model_or_ref)
    names = runnable_suites(cfg) if list(suites) == ["all"] else [SUITES.check(s) for s in suites]
    with scoring_session():  # the suites share the pool's actors
        return [run_suite(name, model_ref, cfg, tracker, parent_run_id, stage=stage) for name in names]


def runnable_suites(cfg: EvalConfig) -> list[str]:
    """What ``all`` means: every registered suite, except those that need shards while theirs are unset (logged)."""
    from robustfm.evals import SUITES

    names, left_out = [], []
    for name in SUITES.names():
        unset = SUITES.get(name).needs_shards and cfg.suites[name].data.shards is None
        (left_out if unset else names).append(name)
    if left_out:
        logger.info("--suite all leaves out %s: set eval.suites.<name>.data.shards to run them", ", ".join(left_out))
    return names


# --- artifacts and tracking ----------------------------------------------------------------------------------------


def safe_name(text: str) -> str:
    """A file-name-safe version of a model label (``open_clip/ViT-B-32@openai`` -> ``open_clip_ViT-B-32_openai``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def write_artifacts(result: SuiteResult) -> None:
    """metrics.json, protocol.json, table.csv, table.json, plots/*.png and images/*.png into ``result.artifact_dir``."""
    from robustfm.evals.plots import render_plot

    directory = result.artifact_dir
    if directory.exists():
        shutil.rmtree(directory)  # a rerun must not log the previous run's plots as its own
    directory.mkdir(parents=True)
    metrics = {"metrics": result.metrics, "directions": result.directions, "counts": result.counts}
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    (directory / "protocol.json").write_text(json.dumps(result.protocol, indent=2))
    (directory / "table.json").write_text(json.dumps(result.table, indent=2))
    fieldnames = list(dict.fromkeys(key for row in result.table for key in row))
    with (directory / "table.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        for row in result.table:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    for plot in result.plots:
        render_plot([(None, plot)], directory / "plots" / f"{plot.name}.png")
    if result.images:
        from PIL import Image

        (directory / "images").mkdir()
        for name, pixels in result.images.items():
            Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(directory / "images" / f"{name}.png")


def log_result(result: SuiteResult, tracker: Any, parent_run_id: str | None) -> str:
    """One (nested) run ``eval/[<stage>/]<suite>``: protocol params, metrics, counts, and every artifact file."""
    tags = {
        "suite": result.suite,
        "suite_version": result.protocol["suite"]["version"],
        "model": result.model,
        "protocol_fingerprint": result.protocol["fingerprint"],
    }
    if result.stage:
        tags["stage"] = result.stage
    run_name = f"eval/{result.stage}/{result.suite}" if result.stage else f"eval/{result.suite}"
    with tracker.start_run(run_name, parent_run_id=parent_run_id, tags=tags) as run:
        loggable = {k: v for k, v in result.protocol.items() if k not in ("metrics", "params")}
        run.log_params(loggable)
        run.log_metrics({key: value for key, value in result.metrics.items() if np.isfinite(value)})
        run.log_metrics({f"counts/{key}": float(value) for key, value in result.counts.items()})
        for path in sorted(result.artifact_dir.rglob("*")):
            if path.is_file():
                relative = path.parent.relative_to(result.artifact_dir)
                run.log_artifact(str(path), None if str(relative) == "." else str(relative))
        return run.run_id


def summarize(results: Sequence[SuiteResult]) -> str:
    """A few lines per suite for the end of a job: counts, time, and the headline metrics."""
    lines = []
    for result in results:
        lines.append(
            f"[{result.suite}] {result.model}: {result.counts['scored']} scored, "
            f"{result.counts['skipped']} skipped, {result.seconds.get('total', 0.0):.1f}s on {result.actors} actor(s), "
            f"protocol {result.protocol['fingerprint']}, artifacts {result.artifact_dir}"
        )
        headline = {k: v for k, v in result.metrics.items() if k.count("/") <= 1}
        for key, value in list(headline.items())[:8]:
            lines.append(f"    {key} = {value:.4f} ({result.directions[key]} is better)")
    return "\n".join(lines)


def load_metrics(path: str | Path) -> Mapping[str, Any]:
    """Read back a suite's ``metrics.json``."""
    return json.loads(Path(path).read_text())
