"""The report card: one markdown file with PNG plots covering every suite for one model, optionally beside a second.

With two models each metric row shows both values, the difference (B - A) and which model is better by the metric's
declared direction. Numbers of a suite are only put side by side when both results have the same protocol
fingerprint; otherwise the card says so instead of comparing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustfm.evals.plots import render_plot
from robustfm.evals.runner import SuiteResult

REPORT_NAME = "report.md"


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _better(a: float, b: float, direction: str) -> str:
    if any(v is None or math.isnan(v) for v in (a, b)) or a == b:
        return "="
    b_wins = b > a if direction == "higher" else b < a
    return "B" if b_wins else "A"


def write_report_card(
    results: Sequence[SuiteResult],
    out_dir: str | Path,
    compare_with: Sequence[SuiteResult] | None = None,
    max_rows_per_suite: int = 60,
) -> Path:
    """Write ``report.md`` and ``plots/*.png`` into ``out_dir`` and return the markdown path.

    Args:
        results: model A's suite results.
        out_dir: report directory (created).
        compare_with: model B's results for the same suites (matched by suite name), or None.
        max_rows_per_suite: metric rows shown per suite (the full tables are in each suite's artifacts).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    others = {r.suite: r for r in compare_with or ()}
    model_a = results[0].model if results else "?"
    model_b = next(iter(others.values())).model if others else None
    lines = [f"# Report card: {model_a}" + (f" vs {model_b}" if model_b else ""), ""]
    if model_b:
        lines += [f"A = `{model_a}`, B = `{model_b}`. *Better* follows each metric's direction.", ""]
    lines += ["| suite | version | protocol | samples | skipped |", "|---|---|---|---|---|"]
    for result in results:
        lines.append(
            f"| {result.suite} | {result.protocol['suite']['version']} | `{result.protocol['fingerprint']}` "
            f"| {result.counts['scored']} | {result.counts['skipped']} |"
        )
    lines.append("")
    for result in results:
        other = others.get(result.suite)
        lines += _suite_section(result, other, out_dir, max_rows_per_suite)
    path = out_dir / REPORT_NAME
    path.write_text("\n".join(lines) + "\n")
    return path


def _suite_section(result: SuiteResult, other: SuiteResult | None, out_dir: Path, max_rows: int) -> list[str]:
    protocol = result.protocol
    lines = [
        f"## {result.suite}",
        "",
        f"Data: {protocol['data']['source']}, {protocol['data']['num_samples']} samples "
        f"(ids sha256 `{protocol['data']['sample_ids_sha256'][:12]}`), seed {protocol['seed']}.",
        "",
    ]
    comparable = other is not None and other.protocol["fingerprint"] == protocol["fingerprint"]
    lines += _summary_table(result, other if comparable else None)
    if other is not None and not comparable:
        lines += [
            f"**Not compared**: B's protocol `{other.protocol['fingerprint']}` differs from A's "
            f"`{protocol['fingerprint']}` (different data, parameters or suite version).",
            "",
        ]
    keys = list(result.metrics)
    shown = keys[:max_rows]
    if comparable:
        lines += ["| metric | better | A | B | B - A | winner |", "|---|---|---|---|---|---|"]
        for key in shown:
            a, b = result.metrics[key], other.metrics.get(key, float("nan"))
            direction = result.directions[key]
            lines.append(
                f"| {key} | {direction} | {_fmt(a)} | {_fmt(b)} | {_fmt(b - a)} | {_better(a, b, direction)} |"
            )
    else:
        lines += ["| metric | better | value |", "|---|---|---|"]
        lines += [f"| {key} | {result.directions[key]} | {_fmt(result.metrics[key])} |" for key in shown]
    if len(keys) > len(shown):
        lines.append(f"\n{len(keys) - len(shown)} more metrics in `{result.artifact_dir / 'metrics.json'}`.")
    lines.append("")
    other_plots = {p.name: p for p in other.plots} if comparable else {}
    for plot in result.plots:
        versions: list[tuple[Any, Any]] = [(result.model if comparable else None, plot)]
        if plot.name in other_plots:
            versions.append((other.model, other_plots[plot.name]))
        relative = Path("plots") / f"{result.suite}__{plot.name}.png"
        render_plot(versions, out_dir / relative)
        lines += [f"![{plot.title}]({relative.as_posix()})", ""]
    return lines


def _summary_table(result: SuiteResult, other: SuiteResult | None) -> list[str]:
    """The suite's headline table, one row per model (its ``summary_columns``); nothing for suites without one."""
    from robustfm.evals import SUITES

    if result.suite not in SUITES:  # a result of a suite this process does not have: its metrics still show below
        return []
    columns = SUITES.get(result.suite).summary_columns(result.params or {})
    if not columns:
        return []
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for model in (result, *([other] if other is not None else [])):
        values = [_fmt(model.metrics.get(key, float("nan"))) for key in columns.values()]
        lines.append(f"| `{model.model}` | " + " | ".join(values) + " |")
    return [*lines, ""]


def log_report_card(path: Path, tracker: Any, parent_run_id: str | None = None, run_name: str = "eval/report") -> str:
    """Log ``report.md`` and its plots to a run (nested under ``parent_run_id``); return the run id."""
    with tracker.start_run(run_name, parent_run_id=parent_run_id) as run:
        run.log_artifact(str(path), "report")
        for plot in sorted((path.parent / "plots").glob("*.png")):
            run.log_artifact(str(plot), "report/plots")
        return run.run_id
