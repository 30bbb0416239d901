"""The evaluation job behind ``jobs/evaluate.py``: start Ray, run suites for one or two models, write the report card.

Everything lands in one MLflow parent run (``evaluate <model>``): one nested run per (model, suite) with its metrics,
protocol, table and plots, and the report card (``report/report.md`` + ``report/plots/*.png``) on the parent.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from robustfm.config.core import ConfigError, to_dict
from robustfm.evals.config import EvaluateJobConfig
from robustfm.evals.model_ref import parse_model_ref
from robustfm.evals.runner import SuiteResult, run_suites, runnable_suites, safe_name, summarize


@dataclass
class EvaluationOutcome:
    """What the job produced: results per model, the report path and the parent MLflow run."""

    results: list[SuiteResult]
    compared: list[SuiteResult]
    report: Path
    parent_run_id: str | None


def ensure_ray(cfg: EvaluateJobConfig) -> None:
    """Join the configured cluster, or start a local Ray on 127.0.0.1, unless this process already has one."""
    from robustfm.runtime import init_ray

    init_ray(cfg.ray, log_to_driver=False)


def evaluate(
    cfg: EvaluateJobConfig, suites: Sequence[str], model: str, compare_with: str | None = None
) -> EvaluationOutcome:
    """Run ``suites`` (or ``["all"]``) on ``model`` (and ``compare_with``), log everything, write the report card.

    Raises:
        robustfm.evals.model_ref.ModelRefError / UnknownNameError / ConfigError: before Ray starts, for a bad model
            or suite name, or a suite section whose files are missing (``Suite.settings_problems``).
    """
    from robustfm.evals import SUITES
    from robustfm.evals.pool import scoring_session
    from robustfm.evals.report import write_report_card
    from robustfm.tracking import create_tracker

    model_a = parse_model_ref(model)
    model_b = parse_model_ref(compare_with) if compare_with else None
    names = runnable_suites(cfg.eval) if list(suites) == ["all"] else [SUITES.check(s) for s in suites]
    problems = [p for name in names for p in SUITES.get(name).settings_problems(cfg.eval.suites[name])]
    if problems:
        raise ConfigError("", "\n".join(problems))
    ensure_ray(cfg)
    tracker = create_tracker(cfg.tracking)
    try:
        title = f"evaluate {model_a.label}" + (f" vs {model_b.label}" if model_b else "")
        with tracker.start_run(title, tags={"job": "evaluate", "suites": ",".join(names)}) as parent:
            parent.log_params(to_dict(cfg))
            with scoring_session():  # both models are scored by the same actors
                results = run_suites(model_a, names, cfg.eval, tracker, parent.run_id)
                compared = run_suites(model_b, names, cfg.eval, tracker, parent.run_id) if model_b else []
            report_dir = Path(cfg.eval.output_dir) / "report" / safe_name(title)
            report = write_report_card(results, report_dir, compare_with=compared or None)
            parent.log_artifact(str(report), "report")
            for plot in sorted((report.parent / "plots").glob("*.png")):
                parent.log_artifact(str(plot), "report/plots")
            parent_run_id = parent.run_id
    finally:
        tracker.close()
    print(summarize(results + compared), file=sys.stdout)
    print(f"report card: {report}")
    return EvaluationOutcome(results, compared, report, parent_run_id)
