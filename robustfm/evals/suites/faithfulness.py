"""Faithfulness of attribution maps: deletion and insertion curves (paper 002 §3.1 Table 1, spec §1.5).

For every image and every attribution method (``cci``, each ``robustfm.explain.RELEVANCE`` entry, and ``random`` as
the sanity floor) the map of the target class (its label, or the model's prediction) ranks the pixels; deletion
replaces the top-ranked ones by U[0,1] noise step by step, insertion reveals them on a constant canvas, and the
target's rank and softmax probability are read at every step
(:func:`robustfm.explain.faithfulness.faithfulness_curves`).
AUCs are taken by the trapezoid rule on ``x = step / steps``: deletion lower is better, insertion higher.

Every method sees the same images, the same per-image tie-break permutation and the same deletion noise (seeded by
the image id), so methods differ by their maps alone. CLIP models are explained and scored through their zero-shot
classifier over the classes present in the data (logits = ``logit_scale.exp()`` x cosine; the explained score is the
cosine, as paper 002 takes it); classifiers through their own logits (labels are their class indices).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from robustfm.config.core import check
from robustfm.evals import SUITES
from robustfm.evals.actors import FieldSpec, ScoringActor
from robustfm.evals.config import EvalDataConfig
from robustfm.evals.metrics import MetricSpec, MetricTable, mean_confidence_interval
from robustfm.evals.suite import Plot, Suite, SuiteOutput
from robustfm.evals.suites.zero_shot import CLASS_TEMPLATES, class_names_by_label
from robustfm.seeding import sample_seed

MODES = ("deletion", "insertion")
CURVES = ("prob", "top1", "top5")
CCI = "cci"
RANDOM = "random"


def all_methods() -> tuple[str, ...]:
    """``cci``, every registered relevance method, and ``random``."""
    from robustfm.explain.relevance import RELEVANCE

    return (CCI, *RELEVANCE.names(), RANDOM)


@dataclass(frozen=True)
class FaithfulnessConfig:
    """Deletion and insertion curves of each attribution method's maps."""

    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """Labelled images (``label``, ``class_name`` columns)."""
    methods: tuple[str, ...] | None = None
    """Attribution methods: ``cci``, ``robustfm.explain.RELEVANCE`` names, ``random``. None: all of them."""
    modes: tuple[str, ...] = MODES
    """``deletion`` and/or ``insertion``."""
    fraction_per_step: float = 0.005
    """Share of the pixels changed per step (paper 002: ~0.5 %)."""
    steps: int = 100
    """Steps per curve (paper: 100, half of the image at 0.5 %)."""
    canvas: float = 0.0
    """Insertion's background value in [0, 1]."""
    target: Literal["label", "prediction"] = "label"
    """The class explained and tracked: the image's label, or the model's clean prediction."""
    templates: tuple[str, ...] = CLASS_TEMPLATES
    """CLIP's prompt templates of the class embeddings (classifiers ignore them)."""
    cci_k: int = 7
    """CCI's clusters per image (paper: 7); at most the model's patches."""
    cci_cluster_on: Literal["final", "final_norm", "input"] = "final"
    """CCI's clustered tokens (``robustfm.explain.cci``)."""
    cci_negative: Literal["keep", "clip"] = "keep"
    """CCI's negative cluster weights: kept (paper) or clipped at 0."""
    forward_batch_size: int = 64
    """Images per forward of the curves and of CCI's masked passes."""

    def __post_init__(self) -> None:
        # Method names are checked on the driver before scoring (their registry imports torch; configs do not).
        check(self.steps >= 1, "steps", self.steps, "must be >= 1")
        check(self.fraction_per_step > 0, "fraction_per_step", self.fraction_per_step, "must be > 0")
        product = self.fraction_per_step * self.steps
        check(product <= 1 + 1e-9, "fraction_per_step", self.fraction_per_step, f"x steps = {product:g} must be <= 1")
        check(len(self.modes) > 0 and set(self.modes) <= set(MODES), "modes", self.modes, f"must be among {MODES}")
        check(0.0 <= self.canvas <= 1.0, "canvas", self.canvas, "must be in [0, 1]")
        check(self.cci_k >= 2, "cci_k", self.cci_k, "must be >= 2 (one cluster explains nothing)")
        check(self.forward_batch_size >= 1, "forward_batch_size", self.forward_batch_size, "must be >= 1")
        check(self.methods is None or len(self.methods) > 0, "methods", self.methods, "must name a method or be null")


class FaithfulnessScorer(ScoringActor):
    """Maps of every method for the batch's images, then their deletion and insertion curves."""

    needs_gradients = True

    def setup(self) -> None:
        from robustfm.evals.class_logits import ClassLogits

        params = self.params
        self.classes = ClassLogits(self.model, params["class_names"], params["templates"], params["index_of"])
        grid = getattr(self.model, "grid_size", None)
        k = self.params["cci_k"]
        if CCI in self.params["methods"] and grid is not None and k > grid[0] * grid[1]:
            raise ValueError(f"eval.suites.faithfulness.cci_k = {k} exceeds the model's {grid[0] * grid[1]} patches")

    def output_fields(self) -> dict[str, FieldSpec]:
        points = (self.params["steps"] + 1,)
        return {
            "method": (object, ()),
            "mode": (object, ()),
            "target": (np.int64, ()),
            "degenerate": (np.int8, ()),
            **{f"auc_{curve}": (np.float32, ()) for curve in CURVES},
            **{f"curve_{curve}": (np.float32, points) for curve in CURVES},
        }

    def score(self, batch: Mapping[str, np.ndarray], pixels: Any) -> list[dict[str, Any]]:
        import torch

        from robustfm.explain.faithfulness import faithfulness_curves

        ids = [str(i) for i in batch["id"]]
        index_of = self.classes.index_of
        keep = [i for i, label in enumerate(batch["label"]) if int(label) in index_of]
        if not keep:
            return []  # unlabelled rows have no class to explain
        ids = [ids[i] for i in keep]
        pixels = pixels[keep]
        with torch.no_grad():
            logits = self.classes(pixels)
        if self.params["target"] == "prediction":
            targets = logits.argmax(dim=1)
        else:
            labels = [index_of[int(batch["label"][i])] for i in keep]
            targets = torch.tensor(labels, dtype=torch.long, device=pixels.device)
        curve_seeds = [sample_seed(i, 0, "faithfulness/ranking", self.seed) for i in ids]
        rows: list[dict[str, Any]] = []
        for method in self.params["methods"]:
            maps, degenerate = self._maps(method, pixels, targets, ids)
            for mode in self.params["modes"]:
                curves = faithfulness_curves(
                    self.classes.forward,
                    pixels,
                    maps,
                    targets,
                    mode=mode,
                    seeds=curve_seeds,
                    logits_fn=self.classes.logits,
                    fraction_per_step=self.params["fraction_per_step"],
                    steps=self.params["steps"],
                    canvas=self.params["canvas"],
                    batch_size=self.params["forward_batch_size"],
                )
                series = {"prob": curves.probs, "top1": curves.topk(1), "top5": curves.topk(5)}
                aucs = {curve: curves.auc(curve).cpu().numpy() for curve in CURVES}
                for row, sample in enumerate(ids):
                    rows.append(
                        {
                            "id": sample,
                            "method": method,
                            "mode": mode,
                            "target": int(targets[row]),
                            "degenerate": int(degenerate[row]),
                            **{f"auc_{c}": float(aucs[c][row]) for c in CURVES},
                            **{f"curve_{c}": series[c][row].float().cpu().numpy() for c in CURVES},
                        }
                    )
        return rows

    def _maps(self, method: str, pixels: Any, targets: Any, ids: list[str]) -> tuple[Any, Any]:
        """``(N, gh, gw)`` maps of ``method`` and which are degenerate (CCI's zero maps; others never)."""
        import torch

        from robustfm.explain.cci import cci
        from robustfm.explain.relevance import relevance

        grid = tuple(getattr(self.model, "grid_size", (pixels.shape[-2], pixels.shape[-1])))
        none = torch.zeros(len(ids), dtype=torch.bool)
        if method == RANDOM:
            seeds = [sample_seed(i, 0, "faithfulness/random", self.seed) for i in ids]
            draws = [torch.rand(grid, generator=torch.Generator().manual_seed(seed)) for seed in seeds]
            return torch.stack(draws).to(pixels.device), none
        score = self.classes.target_score(targets)
        if method == CCI:
            found = cci(
                self.model,
                pixels,
                score,
                seeds=[sample_seed(i, 0, "faithfulness/cci", self.seed) for i in ids],
                k=self.params["cci_k"],
                cluster_on=self.params["cci_cluster_on"],
                negative=self.params["cci_negative"],
                batch_size=self.params["forward_batch_size"],
            )
            return found.map, found.degenerate.cpu()
        return relevance(method, self.model, pixels, score), none


@SUITES.register("faithfulness", config=FaithfulnessConfig)
class FaithfulnessSuite(Suite):
    name = "faithfulness"
    version = "1"
    scorer = FaithfulnessScorer
    columns = ("label", "class_name")
    sort_keys = ("id", "method", "mode")
    metric_specs = (
        MetricSpec(
            "deletion_auc",
            "lower",
            "area under the curve of the target's probability or top-k hit as the "
            "map's most relevant pixels are replaced by noise (x = step / steps)",
        ),  # fmt: skip
        MetricSpec(
            "insertion_auc",
            "higher",
            "area under the curve of the target's probability or top-k hit as the "
            "map's most relevant pixels are revealed on the canvas (x = step / steps)",
        ),  # fmt: skip
        MetricSpec("degenerate", "lower", "share of images whose CCI clusters explained nothing (zero map)"),
    )

    def scorer_params(self, dataset: Any) -> dict[str, Any]:
        section = self.section
        known = all_methods()
        unknown = [m for m in section.methods or () if m not in known]
        if unknown:
            raise ValueError(f"eval.suites.faithfulness.methods: unknown {unknown}; known: {list(known)}")
        classes = class_names_by_label(dataset)
        return {
            "class_names": list(classes.values()),
            "index_of": {label: index for index, label in enumerate(classes)},
            "templates": list(section.templates),
            "methods": list(section.methods or all_methods()),
            "modes": list(section.modes),
            "fraction_per_step": float(section.fraction_per_step),
            "steps": int(section.steps),
            "canvas": float(section.canvas),
            "target": section.target,
            "cci_k": int(section.cci_k),
            "cci_cluster_on": section.cci_cluster_on,
            "cci_negative": section.cci_negative,
            "forward_batch_size": int(section.forward_batch_size),
            # What the protocol must say about choices the paper leaves open (spec §1.5).
            "tie_break": "seeded random permutation per image (id-derived), the same for every method",
            "deletion_fill": "U[0,1] noise per image (id-derived seed), the same for every method",
        }

    @classmethod
    def summary_columns(cls, params: Mapping[str, Any]) -> dict[str, str]:
        if CCI not in params.get("methods", ()):
            return {}
        return {f"{mode} AUC@{k} (cci)": f"{mode}/{CCI}/auc_top{k}" for mode in params["modes"] for k in (1, 5)}

    def aggregate(self, rows: Mapping[str, np.ndarray], params: Mapping[str, Any]) -> SuiteOutput:
        methods = np.asarray(rows["method"]).astype(str)
        modes = np.asarray(rows["mode"]).astype(str)
        metrics, table, plots = MetricTable(), [], []
        x = [step * params["fraction_per_step"] for step in range(params["steps"] + 1)]
        for mode in params["modes"]:
            series = {}
            for method in params["methods"]:
                chosen = (methods == method) & (modes == mode)
                if not chosen.any():
                    continue
                entry: dict[str, Any] = {"mode": mode, "method": method, "n_images": int(chosen.sum())}
                for curve in CURVES:
                    values = np.asarray(rows[f"auc_{curve}"], dtype=np.float64)[chosen]
                    mean, low, high = mean_confidence_interval(values.tolist())
                    metrics.add(f"{mode}/{method}/auc_{curve}", mean, self.spec(f"{mode}_auc"))
                    entry.update({f"auc_{curve}": mean, f"auc_{curve}_ci95": [low, high]})
                table.append(entry)
                series[method] = (x, np.asarray(rows["curve_prob"], dtype=np.float64)[chosen].mean(0).tolist())
            plots.append(
                Plot(f"{mode}_curves", f"{mode.capitalize()}: target probability", "fraction of pixels", "p", series)
            )
        cci_rows = methods == CCI
        if cci_rows.any():
            share = float(np.asarray(rows["degenerate"])[cci_rows].mean())
            metrics.add("cci/degenerate", share, self.spec("degenerate"))
        return SuiteOutput(metrics, table, plots)
