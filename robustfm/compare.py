"""Compare MLflow runs: the config values that differ, the final metrics, metric curves and sweep plots.

Used by ``jobs/compare.py``. Reads MLflow only (never a live trainer), so it works on any finished or running
experiment, local SQLite store or tracking server alike.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PARENT_TAG = "mlflow.parentRunId"


@dataclass(frozen=True)
class RunSummary:
    """What the comparison needs of one MLflow run."""

    run_id: str
    name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    parent_run_id: str | None


@dataclass
class Comparison:
    """The comparison table and where its files were written."""

    runs: list[RunSummary]
    differing_params: list[str]
    metric_names: list[str]
    files: dict[str, Path] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """One row per run: name, id, the params that differ, the final metrics."""
        rows = []
        for run in self.runs:
            row: dict[str, Any] = {"run": run.name, "run_id": run.run_id[:8], "status": run.status}
            row.update({p: run.params.get(p, "") for p in self.differing_params})
            row.update({m: run.metrics.get(m, math.nan) for m in self.metric_names})
            rows.append(row)
        return rows

    def markdown(self) -> str:
        """The table as GitHub markdown; metrics with 4 significant digits."""
        rows = self.rows()
        if not rows:
            return "_no runs_\n"
        header = list(rows[0])
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in rows:
            lines.append("| " + " | ".join(_fmt(row[h]) for h in header) + " |")
        return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def load_runs(
    client: Any, experiment: str, run_ids: Sequence[str] = (), parent_run_id: str | None = None
) -> list[RunSummary]:
    """The runs to compare: ``run_ids`` (ids or names), the children of ``parent_run_id``, or every top-level run.

    Raises:
        ValueError: naming the experiment or the run that does not exist.
    """
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ValueError(f"no MLflow experiment named {experiment!r} (experiments: {', '.join(names) or 'none'})")
    found = client.search_runs([exp.experiment_id], max_results=5000, order_by=["attributes.start_time ASC"])
    summaries = [
        RunSummary(
            run_id=r.info.run_id,
            name=r.info.run_name or r.info.run_id[:8],
            status=r.info.status,
            params=dict(r.data.params),
            metrics=dict(r.data.metrics),
            parent_run_id=r.data.tags.get(PARENT_TAG),
        )
        for r in found
    ]
    if run_ids:
        by_key = {s.run_id: s for s in summaries} | {s.name: s for s in summaries}
        missing = [r for r in run_ids if r not in by_key]
        if missing:
            raise ValueError(f"runs not found in experiment {experiment!r}: {', '.join(missing)}")
        return [by_key[r] for r in run_ids]
    if parent_run_id is not None:
        return [s for s in summaries if s.parent_run_id == parent_run_id]
    return [s for s in summaries if s.parent_run_id is None]


def compare_runs(runs: list[RunSummary], metrics: Sequence[str] = ()) -> Comparison:
    """Keep the params whose values differ between runs, and the requested (default: all) final metrics."""
    all_params = sorted({p for r in runs for p in r.params})
    differing = [p for p in all_params if len({r.params.get(p) for r in runs}) > 1]
    metric_names = list(metrics) or sorted({m for r in runs for m in r.metrics})
    return Comparison(runs=runs, differing_params=differing, metric_names=metric_names)


def write_comparison(comparison: Comparison, out_dir: str | Path) -> Comparison:
    """Write ``comparison.md`` and ``comparison.csv`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(comparison.markdown())
    rows = comparison.rows()
    with (out / "comparison.csv").open("w", newline="") as handle:
        if rows:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    comparison.files.update(markdown=out / "comparison.md", csv=out / "comparison.csv")
    return comparison


def plot_metric_curves(client: Any, comparison: Comparison, out_dir: str | Path) -> list[Path]:
    """One PNG per metric: its history (value against step) for every run that logged it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for metric in comparison.metric_names:
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = 0
        for run in comparison.runs:
            history = sorted(client.get_metric_history(run.run_id, metric), key=lambda m: (m.step, m.timestamp))
            if history:
                ax.plot([m.step for m in history], [m.value for m in history], marker=".", label=run.name)
                drawn += 1
        if drawn:
            ax.set(xlabel="step", ylabel=metric, title=metric)
            ax.legend(fontsize="small")
            paths.append(_save(fig, Path(out_dir) / f"curve_{_safe(metric)}.png"))
        plt.close(fig)
    return paths


def plot_sweep(comparison: Comparison, target: str, out_dir: str | Path) -> list[Path]:
    """One PNG per swept parameter: the target metric of each trial against the parameter's value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for param in comparison.differing_params:
        points = []
        for run in comparison.runs:
            try:
                points.append((float(run.params[param]), run.metrics[target]))
            except (KeyError, ValueError):
                continue  # non-numeric parameter, or a trial stopped before reporting the target
        if len(points) < 2:
            continue
        fig, ax = plt.subplots(figsize=(5, 4))
        xs, ys = zip(*points, strict=True)
        ax.scatter(xs, ys)
        if min(xs) > 0 and max(xs) / min(xs) > 50:
            ax.set_xscale("log")
        ax.set(xlabel=param, ylabel=target, title=f"{target} vs {param}")
        paths.append(_save(fig, Path(out_dir) / f"sweep_{_safe(param)}.png"))
        plt.close(fig)
    return paths


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
