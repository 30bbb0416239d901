"""Relevance maps, CCI attribution and deletion/insertion faithfulness for robustfm's ViTs.

- :func:`relevance` / :data:`RELEVANCE`: ``gae``, ``rollout``, ``attn_gradcam``, ``gradcam``, ``input_gradient``,
  ``attnlrp`` patch-grid maps, differentiable with ``create_graph=True`` (CFT trains through them);
- :func:`cci`: cluster-masked attention attribution (paper 002 §3);
- :func:`faithfulness_curves`: deletion / insertion curves and their AUCs (paper 002 §3.1).

Importing this package imports torch but no model library (open_clip, timm, sklearn load on first use).
"""

from robustfm.explain.cci import CCIResult, cci
from robustfm.explain.faithfulness import FaithfulnessCurves, curve_auc, faithfulness_curves
from robustfm.explain.relevance import (
    RELEVANCE,
    ScoreFn,
    class_logit_score,
    clip_class_score,
    normalize_maps,
    relevance,
    to_pixels,
)

__all__ = [
    "RELEVANCE",
    "CCIResult",
    "FaithfulnessCurves",
    "ScoreFn",
    "cci",
    "class_logit_score",
    "clip_class_score",
    "curve_auc",
    "faithfulness_curves",
    "normalize_maps",
    "relevance",
    "to_pixels",
]
