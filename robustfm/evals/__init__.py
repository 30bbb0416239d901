"""Evaluation suites scored by Ray actor pools, with metrics that carry their direction and protocol.

Each suite is one module of ``robustfm/evals/suites/`` that registers itself in :data:`SUITES` with its config class
(modules are imported on the first lookup; they import numpy, never torch or ray at import time) and declares its
data, its scoring actor class, its aggregation and the direction of every metric (:class:`robustfm.evals.suite.Suite`).

Usage::

    from robustfm.evals import evaluate_model, run_suite
    from robustfm.evals.config import EvalConfig

    result = run_suite("retrieval", "open_clip/ViT-B-32@openai", EvalConfig(), tracker)
    metrics = evaluate_model("/runs/cgclip/export/model.safetensors", ["all"], EvalConfig(), tracker, parent_run_id)
"""

from __future__ import annotations

from typing import Any

from robustfm.registry import Registry

SUITES: Registry[Any] = Registry("evaluation suite", discover="robustfm.evals.suites")
"""Every module of ``robustfm/evals/suites/`` registers its suite with its config class (meta ``config``): adding a
suite is adding one file there."""


def run_suite(*args: Any, **kwargs: Any) -> Any:
    """See :func:`robustfm.evals.runner.run_suite` (imported on first call: it pulls numpy, ray, sklearn)."""
    from robustfm.evals.runner import run_suite as run

    return run(*args, **kwargs)


def evaluate_model(*args: Any, **kwargs: Any) -> dict[str, float]:
    """See :func:`robustfm.evals.runner.evaluate_model`."""
    from robustfm.evals.runner import evaluate_model as evaluate

    return evaluate(*args, **kwargs)


__all__ = ["SUITES", "evaluate_model", "run_suite"]
