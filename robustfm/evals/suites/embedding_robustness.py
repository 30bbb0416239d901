"""Embedding robustness to everyday edits (paper 004): how far embeddings move over a perturbation's parameter sweep.

For each image ``x`` and perturbation ``P`` with equally spaced values ``k_1..k_n`` (``robustfm.perturbations.sweep``,
ends included), with ``f`` the L2-normalized image embedding:

- ``mean_cosine`` = mean_j cos(f(P(x, k_j)), f(x));
- ``worst_cosine`` = min_j cos(f(P(x, k_j)), f(x));
- ``divergence_radius`` = radius of the minimum enclosing ball of {f(P(x, k_j))} (Welzl, ``miniball``).

Per perturbation, the suite reports the mean over images of each, and ``<perturbation>:<value>/cosine``, the mean
cosine at each value (named like the ``zero_shot`` suite's conditions, so that embedding change and accuracy drop
line up value by value: paper 004's "robustness values predict performance impacts"); the plot shows the latter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from robustfm.config.core import check
from robustfm.evals import SUITES
from robustfm.evals.actors import FieldSpec, ScoringActor
from robustfm.evals.config import EvalDataConfig
from robustfm.evals.metrics import MetricSpec, MetricTable, divergence_radius, mean_of
from robustfm.evals.suite import Plot, Suite, SuiteOutput, condition_name, resolve_names
from robustfm.seeding import sample_seed


@dataclass(frozen=True)
class EmbeddingRobustnessConfig:
    """Embedding stability over perturbation sweeps (paper 004): mean/worst cosine and DivergenceRadius."""

    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """Images to perturb."""
    perturbations: tuple[str, ...] | None = None
    """Perturbations to sweep (None: every registered one)."""
    steps: int = 9
    """Equally spaced parameter values per perturbation, ends included."""

    def __post_init__(self) -> None:
        check(self.steps >= 2, "steps", self.steps, "must be >= 2 (an enclosing ball of one point is trivial)")


class EmbeddingRobustnessScorer(ScoringActor):
    """Per (image, perturbation): cosine to the clean embedding at each sweep value and the enclosing-ball radius."""

    def output_fields(self) -> dict[str, FieldSpec]:
        steps = len(next(iter(self.params["sweeps"].values())))
        return {"perturbation": (object, ()), "cosines": (np.float64, (steps,)), "radius": (np.float64, ())}

    def score(self, batch: Mapping[str, np.ndarray], pixels: Any) -> list[dict[str, Any]]:
        import torch

        from robustfm.perturbations import perturb

        ids = [str(i) for i in batch["id"]]
        clean = self.encode_images(pixels).double().cpu().numpy()
        rows = []
        for name, values in self.params["sweeps"].items():
            perturbed = []
            for step, value in enumerate(values):
                generators = [
                    torch.Generator().manual_seed(sample_seed(i, 0, f"eval_perturb/{name}/{step}", self.seed))
                    for i in ids
                ]
                perturbed.append(self.encode_images(perturb(pixels, name, value, generators)).double().cpu().numpy())
            stacked = np.stack(perturbed, axis=1)  # [n_images, steps, E], rows already unit norm
            for index, sample_id in enumerate(ids):
                points = stacked[index]
                rows.append(
                    {
                        "id": sample_id,
                        "perturbation": name,
                        "cosines": points @ clean[index],
                        "radius": divergence_radius(points, seed=self.seed),
                    }
                )
        return rows


@SUITES.register("embedding_robustness", config=EmbeddingRobustnessConfig)
class EmbeddingRobustnessSuite(Suite):
    name = "embedding_robustness"
    version = "2"
    scorer = EmbeddingRobustnessScorer
    sort_keys = ("id", "perturbation")
    metric_specs = (
        MetricSpec(
            "mean_cosine",
            "higher",
            "mean over images of the mean cosine between perturbed and clean embeddings over the sweep",
        ),
        MetricSpec(
            "worst_cosine", "higher", "mean over images of the lowest cosine to the clean embedding over the sweep"
        ),
        MetricSpec(
            "divergence_radius",
            "lower",
            "mean over images of the minimum-enclosing-ball radius of the L2-normalized perturbed embeddings (Welzl)",
        ),
        MetricSpec("cosine", "higher", "mean over images of the cosine between perturbed and clean embeddings"),
    )

    def scorer_params(self, dataset: Any) -> dict[str, Any]:
        from robustfm.perturbations import PERTURBATIONS, sweep

        names = resolve_names(self.section.perturbations, PERTURBATIONS.names(), PERTURBATIONS, "perturbation")
        return {"sweeps": {name: sweep(name, self.section.steps) for name in names}}

    def aggregate(self, rows: Mapping[str, np.ndarray], params: Mapping[str, Any]) -> SuiteOutput:
        perturbation = np.asarray(rows["perturbation"]).astype(str)
        cosines = np.asarray(rows["cosines"], dtype=np.float64)
        radius = np.asarray(rows["radius"], dtype=np.float64)
        metrics, table, curves = MetricTable(), [], {}
        summary: dict[str, dict[str, float]] = {"mean_cosine": {}, "worst_cosine": {}, "divergence_radius": {}}
        for name, values in params["sweeps"].items():
            mask = perturbation == name
            per_image = {
                "mean_cosine": cosines[mask].mean(axis=1),
                "worst_cosine": cosines[mask].min(axis=1),
                "divergence_radius": radius[mask],
            }
            for family, per_image_values in per_image.items():
                value = float(per_image_values.mean())
                summary[family][name] = value
                metrics.add(f"{name}/{family}", value, self.spec(family))
            for parameter, cosine in zip(values, cosines[mask].mean(axis=0), strict=True):
                metrics.add(f"{condition_name(name, parameter)}/cosine", float(cosine), self.spec("cosine"))
            table.append(
                {
                    "perturbation": name,
                    "n_images": int(mask.sum()),
                    **{family: summary[family][name] for family in per_image},
                    "min_worst_cosine": float(cosines[mask].min()),
                    "max_divergence_radius": float(radius[mask].max()),
                    "values": list(values),
                    "mean_cosine_at_value": cosines[mask].mean(axis=0).tolist(),
                }
            )
            curves[name] = (list(values), cosines[mask].mean(axis=0).tolist())
        for family, per_perturbation in summary.items():
            metrics.add(f"mean/{family}", mean_of(per_perturbation), self.spec(family))
        return SuiteOutput(metrics, table, self._plots(curves, summary))

    def _plots(
        self, curves: Mapping[str, tuple[list[float], list[float]]], summary: Mapping[str, Mapping[str, float]]
    ) -> list[Plot]:
        plots = [
            Plot(
                f"cosine_vs_{name}",
                f"Mean cosine to the clean embedding vs {name}",
                name,
                "mean cosine",
                {"mean cosine": curve},
            )
            for name, curve in curves.items()
        ]
        names = list(summary["divergence_radius"])
        plots.append(
            Plot(
                "divergence_radius",
                "DivergenceRadius per perturbation (lower is more stable)",
                "perturbation",
                "radius",
                {"radius": (names, [summary["divergence_radius"][n] for n in names])},
                kind="bar",
            )
        )
        return plots
