"""Evaluation suites run by Ray Data actor pools, with metrics that carry their direction and protocol.

Each suite is registered in :data:`SUITES` (lazily: listing names imports nothing heavy) and declares its data, its
scoring actor class, its aggregation and the direction of every metric (:class:`robustfm.evals.suite.Suite`).

Usage::

    from robustfm.evals import evaluate_model, run_suite
    from robustfm.evals.config import EvalConfig

    result = run_suite("retrieval", "open_clip/ViT-B-32@openai", EvalConfig(), tracker)
    metrics = evaluate_model("/runs/cgclip/export/model.safetensors", ["all"], EvalConfig(), tracker, parent_run_id)
"""

from __future__ import annotations

from typing import Any

from robustfm.registry import Registry

SUITES: Registry[Any] = Registry("evaluation suite")
SUITES.register_lazy(
    "corruption_detection",
    "robustfm.evals.suites.corruption_detection:CorruptionDetectionSuite",
    description="clean-vs-corrupted detection: zero-shot prompts and a linear probe (CG-CLIP)",
)
SUITES.register_lazy(
    "zero_shot",
    "robustfm.evals.suites.zero_shot:ZeroShotSuite",
    description="zero-shot top-1/top-5, clean and under corruptions and perturbations",
)
SUITES.register_lazy(
    "embedding_robustness",
    "robustfm.evals.suites.embedding_robustness:EmbeddingRobustnessSuite",
    description="mean/worst cosine and DivergenceRadius over perturbation sweeps (paper 004)",
)
SUITES.register_lazy(
    "retrieval",
    "robustfm.evals.suites.retrieval:RetrievalSuite",
    description="image-to-text and text-to-image Recall@K on COCO-style captions",
)


def run_suite(*args: Any, **kwargs: Any) -> Any:
    """See :func:`robustfm.evals.runner.run_suite` (imported on first call: it pulls numpy, ray, sklearn)."""
    from robustfm.evals.runner import run_suite as run

    return run(*args, **kwargs)


def evaluate_model(*args: Any, **kwargs: Any) -> dict[str, float]:
    """See :func:`robustfm.evals.runner.evaluate_model`."""
    from robustfm.evals.runner import evaluate_model as evaluate

    return evaluate(*args, **kwargs)


__all__ = ["SUITES", "evaluate_model", "run_suite"]
