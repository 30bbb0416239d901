"""COVAR (paper 002 §4): zero-shot accuracy on controlled variants of each object, and why the errors happen.

Per image with a foreground ``mask``: the original; "Bg-varied" composites of its foreground on ``n_backgrounds``
backgrounds drawn from a pool (seeded by the image id); and each structured variant (flips, translation, crop,
rotation, scale) of each Bg-varied image (:mod:`robustfm.perturbations.covar`, generated in the actor, nothing
stored). Reported per subset: top-1 / top-5 over the label space (``present`` classes or all of ``imagenet1k``), the
per-class drop against the original images (mean and max over classes), and the error mix: for every error the CCI
map of the predicted class says whether the background drove it (BG-Er: the map's soft IoU with the background
exceeds that with the foreground), else it is fine-grained (Fine-Er: the (truth, prediction) pair is listed in
``similar_pairs``) or other. Without a pairs table the text-embedding cosine of the two class names >= ``fine_er_tau``
is reported as ``fine_er_proxy``, never as Fine-Er.

Offline deviations from the paper (``OFFLINE_DEVIATIONS``, in the protocol) make COVAR-offline numbers not
comparable with the paper's Tables 3-4.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from robustfm.config.core import check
from robustfm.evals import SUITES
from robustfm.evals.actors import FieldSpec, ScoringActor
from robustfm.evals.config import EvalDataConfig
from robustfm.evals.covar_inputs import (
    OFFLINE_DEVIATIONS,
    CovarBackgroundsConfig,
    backgrounds_of,
    fine_error_kind,
    foreground_mask,
    load_backgrounds,
    map_overlap,
    read_similar_pairs,
)
from robustfm.evals.metrics import MetricSpec, MetricTable
from robustfm.evals.suite import Plot, Suite, SuiteOutput
from robustfm.evals.suites.zero_shot import CLASS_TEMPLATES, class_names_by_label
from robustfm.seeding import sample_seed

ORIGINAL, BG_VARIED = "original", "bg_varied"


@dataclass(frozen=True)
class CovarConfig:
    """COVAR variants of masked objects, scored zero-shot, with CCI error analysis."""

    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """Labelled images with a foreground ``mask`` column (``jobs/prepare_data.py`` with ``source.masks``)."""
    backgrounds: CovarBackgroundsConfig = field(default_factory=CovarBackgroundsConfig)
    """Where the Bg-varied backgrounds come from (required)."""
    n_backgrounds: int = 3
    """Backgrounds per image, drawn from the pool by the image id (paper: 20)."""
    variants: tuple[str, ...] = ("hflip", "vflip", "translate", "crop", "rotation", "scale")
    """Structured variants of each Bg-varied image (``robustfm.perturbations.covar.COVAR_VARIANTS``)."""
    canvas: Literal["background", "black"] = "background"
    """What surrounds a scaled-down composite."""
    label_space: Literal["present", "imagenet1k"] = "present"
    """Classes the zero-shot classifier chooses among (``robustfm.evals.label_spaces``)."""
    templates: tuple[str, ...] = CLASS_TEMPLATES
    """CLIP prompt templates (classifiers ignore them)."""
    error_analysis: bool = True
    """Explain every error with a CCI map of the predicted class (BG-Er / Fine-Er / other)."""
    binarize: Literal["soft", "mean"] = "soft"
    """IoU of a map with the masks: soft (sum min / sum max of the [0,1] map and the mask) or hard, the map
    thresholded at its mean."""
    similar_pairs: str | None = None
    """CSV of similar class pairs (two class-name columns, header row): an FG-driven error on such a pair is Fine-Er."""
    fine_er_tau: float = 0.8
    """Without ``similar_pairs``: text-embedding cosine of (truth, prediction) at or above which an FG-driven error
    counts as ``fine_er_proxy`` (CLIP only)."""
    cci_k: int = 7
    """CCI clusters per image (paper: 7)."""
    forward_batch_size: int = 64
    """Images per forward."""

    def __post_init__(self) -> None:
        check(self.n_backgrounds >= 1, "n_backgrounds", self.n_backgrounds, "must be >= 1")
        check(self.cci_k >= 2, "cci_k", self.cci_k, "must be >= 2 (one cluster explains nothing)")
        check(-1.0 <= self.fine_er_tau <= 1.0, "fine_er_tau", self.fine_er_tau, "must be a cosine in [-1, 1]")
        check(self.forward_batch_size >= 1, "forward_batch_size", self.forward_batch_size, "must be >= 1")
        check(len(set(self.variants)) == len(self.variants), "variants", self.variants, "must not repeat a variant")


class CovarScorer(ScoringActor):
    """Generates each image's COVAR rows, scores them zero-shot and explains the errors with CCI."""

    keeps_encoded_image = True  # the stored image size is checked against the mask's

    def setup(self) -> None:
        import torch

        from robustfm.evals.class_logits import ClassLogits
        from robustfm.evals.data import decode_batch

        params = self.params
        self.classes = ClassLogits(
            self.model, params["class_names"], params["templates"], params["index_of"],
            head_indexed=params["label_space"] == "present",
        )  # fmt: skip
        grid, k = getattr(self.model, "grid_size", None), params["cci_k"]
        if params["error_analysis"] and grid is not None and k > grid[0] * grid[1]:
            raise ValueError(f"eval.suites.covar.cci_k = {k} exceeds the model's {grid[0] * grid[1]} patches")
        ids = sorted(params["backgrounds"])
        pixels, reasons = decode_batch([params["backgrounds"][i] for i in ids], ids, self.model.image_size)
        self.bad_backgrounds = [i for i, reason in zip(ids, reasons, strict=True) if reason is not None]
        good = [i for i, reason in zip(ids, reasons, strict=True) if reason is None]
        if not good:
            raise ValueError(f"covar: no background of the pool decodes ({len(ids)} tried)")
        self.backgrounds = {i: torch.from_numpy(p) for i, p in zip(good, pixels, strict=True)}

    def output_fields(self) -> dict[str, FieldSpec]:
        return {
            "subset": (object, ()),
            "background": (object, ()),
            "target": (np.int64, ()),
            "top5": (np.int64, (5,)),
            "error": (object, ()),
            "class_cosine": (np.float32, ()),
            "degenerate": (np.int8, ()),
        }

    def score(self, batch: Mapping[str, np.ndarray], pixels: Any) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for index, sample in enumerate(str(i) for i in batch["id"]):
            label = int(batch["label"][index])
            mask, problem = foreground_mask(batch["image"][index], batch["mask"][index], self.model.image_size, sample)
            if label not in self.classes.index_of:
                problem = "unlabelled"
            if problem:
                rows.append({"id": sample, "status": problem})
                continue
            rows.extend(self._image_rows(sample, self.classes.index_of[label], pixels[index], mask))
        return rows

    def _image_rows(self, sample: str, target: int, image: Any, mask: Any) -> list[dict[str, Any]]:
        import torch

        from robustfm.perturbations.covar import covar_rows

        params = self.params
        chosen = backgrounds_of(sample, sorted(self.backgrounds), params["n_backgrounds"], self.seed)
        variants = covar_rows(
            image, mask, {b: self.backgrounds[b] for b in chosen}, sample,
            variants=params["variants"], seed=self.seed, canvas=params["canvas"],
        )  # fmt: skip
        images = torch.stack([row[2] for row in variants])
        masks = torch.stack([row[3] for row in variants])[:, 0]
        chunk = params["forward_batch_size"]
        logits = torch.cat([self.classes(images[i : i + chunk]) for i in range(0, len(images), chunk)])
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top5 = torch.nn.functional.pad(top5, (0, 5 - top5.shape[1]), value=-1)
        errors = (top5[:, 0] != target).nonzero().flatten().tolist()
        kinds, degenerate = self._explain(images, masks, top5[:, 0], errors, sample)
        cosine = self._class_cosine(target, top5[:, 0])
        return [
            {
                "id": sample, "subset": subset, "background": background, "target": target,
                "top5": top5[i].cpu().numpy(), "error": kinds.get(i, ""), "class_cosine": cosine[i],
                "degenerate": int(degenerate.get(i, 0)),
            }
            for i, (subset, background, _, _) in enumerate(variants)
        ]  # fmt: skip

    def _explain(
        self, images: Any, masks: Any, predicted: Any, errors: list[int], sample: str
    ) -> tuple[dict[int, str], dict[int, bool]]:
        """``bg`` or ``fg`` per erroneous row (which region the predicted class's CCI map overlaps more)."""
        if not errors or not self.params["error_analysis"]:
            return {}, {}
        import torch

        from robustfm.explain.cci import cci
        from robustfm.explain.relevance import to_pixels

        picked = torch.tensor(errors)
        found = cci(
            self.model, images[picked], self.classes.target_score(predicted[picked]),
            seeds=[sample_seed(sample, i, "covar/cci", self.seed) for i in errors], k=self.params["cci_k"],
            batch_size=self.params["forward_batch_size"],
        )  # fmt: skip
        maps, _ = to_pixels(found.map, images.shape[-2:])
        fg = masks[picked]
        binarize = self.params["binarize"]
        background_driven = map_overlap(maps, 1 - fg, binarize) > map_overlap(maps, fg, binarize)
        kinds = {row: ("bg" if bg else "fg") for row, bg in zip(errors, background_driven.tolist(), strict=True)}
        return kinds, dict(zip(errors, found.degenerate.tolist(), strict=True))

    def _class_cosine(self, target: int, predicted: Any) -> list[float]:
        """Text-embedding cosine of the true and each predicted class (CLIP; NaN for classifiers)."""
        if not self.classes.clip:
            return [float("nan")] * len(predicted)
        text = self.classes.text
        return (text[predicted] @ text[target]).float().cpu().tolist()


@SUITES.register("covar", config=CovarConfig)
class CovarSuite(Suite):
    name = "covar"
    version = "1"
    scorer = CovarScorer
    columns = ("label", "class_name", "mask")
    sort_keys = ("id", "subset", "background")
    needs_shards = True
    metric_specs = (
        MetricSpec("top1", "higher", "share of a subset's images whose class has the highest logit"),
        MetricSpec("top5", "higher", "share of a subset's images whose class is among the 5 highest logits"),
        MetricSpec("class_drop", "lower", "per class, top-1 on the original images minus top-1 on the subset"),
        MetricSpec("bg_er", "lower", "share of a subset's errors whose CCI map overlaps the background more"),
        MetricSpec("fine_er", "lower", "share of errors, foreground-driven, on a listed similar class pair"),
        MetricSpec(
            "fine_er_proxy",
            "lower",
            "share of errors, foreground-driven, whose two class names' text "
            "embeddings have cosine >= fine_er_tau (a proxy, not the paper's Fine-Er)",
        ),  # fmt: skip
        MetricSpec("other_er", "lower", "share of errors that are neither BG-Er nor (proxy) Fine-Er"),
        MetricSpec("degenerate", "lower", "share of explained errors whose CCI map was zero"),
    )

    @classmethod
    def settings_problems(cls, section: CovarConfig) -> list[str]:
        from robustfm.perturbations.covar import COVAR_VARIANTS

        problems = []
        unknown = [v for v in section.variants if v not in COVAR_VARIANTS]
        if unknown:
            problems.append(f"eval.suites.covar.variants: unknown {unknown}; known: {list(COVAR_VARIANTS)}")
        try:
            load_backgrounds(section.backgrounds)
        except (ValueError, OSError) as err:
            problems.append(str(err))
        if section.similar_pairs and not Path(section.similar_pairs).is_file():
            problems.append(f"eval.suites.covar.similar_pairs: {section.similar_pairs!r} does not exist")
        return problems

    def scorer_params(self, dataset: Any) -> dict[str, Any]:
        from robustfm.evals.label_spaces import resolve_label_space

        section = self.section
        space = resolve_label_space(section.label_space, class_names_by_label(dataset))
        return {
            "class_names": space.class_names,
            "index_of": space.index_of,
            "label_space": section.label_space,
            "templates": list(section.templates),
            "backgrounds": load_backgrounds(section.backgrounds),
            "n_backgrounds": section.n_backgrounds,
            "variants": list(section.variants),
            "canvas": section.canvas,
            "error_analysis": section.error_analysis,
            "binarize": section.binarize,
            "cci_k": section.cci_k,
            "forward_batch_size": section.forward_batch_size,
            "similar_pairs": section.similar_pairs,
            "fine_er_tau": section.fine_er_tau,
        }

    def protocol_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The base record with the pool as its size and the SHA-256 of its ids, and the offline deviations."""
        ids = sorted(params["backgrounds"])
        record = {k: v for k, v in params.items() if k not in ("backgrounds", "class_names", "index_of")}
        record["backgrounds"] = {"count": len(ids), "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()}
        record["classes"] = len(params["class_names"])
        record["offline_deviations"] = list(OFFLINE_DEVIATIONS)
        return super().protocol_params(record)

    @classmethod
    def summary_columns(cls, params: Mapping[str, Any]) -> dict[str, str]:
        return {"original top-1": f"{ORIGINAL}/top1", "Bg-varied top-1": f"{BG_VARIED}/top1",
                "mean class drop": "class_drop/mean"}  # fmt: skip

    def aggregate(self, rows: Mapping[str, np.ndarray], params: Mapping[str, Any]) -> SuiteOutput:
        subset = np.asarray(rows["subset"]).astype(str)
        target = np.asarray(rows["target"], dtype=np.int64)
        top5 = np.asarray(rows["top5"], dtype=np.int64)
        correct1 = top5[:, 0] == target
        correct5 = (top5 == target[:, None]).any(axis=1)
        names = [ORIGINAL, BG_VARIED, *params["variants"]]
        metrics, table = MetricTable(), []
        accuracy: dict[str, float] = {}
        for name in names:
            chosen = subset == name
            accuracy[name] = float(correct1[chosen].mean()) if chosen.any() else float("nan")
            metrics.add(f"{name}/top1", accuracy[name], self.spec("top1"))
            metrics.add(f"{name}/top5", float(correct5[chosen].mean()) if chosen.any() else float("nan"),
                        self.spec("top5"))  # fmt: skip
            table.append({"subset": name, "rows": int(chosen.sum()), "top1": accuracy[name]})
        drops = self._class_drops(subset, target, correct1, names[1:], params, metrics)
        mix = self._error_mix(subset, target, top5[:, 0], rows, names, params, metrics)
        for entry in table:
            entry.update(mix.get(entry["subset"], {}))
        plots = [
            Plot("top1_per_subset", "COVAR top-1 per subset", "subset", "top-1",
                 {"top-1": (names, [accuracy[n] for n in names])}, kind="bar"),
            Plot("class_drop", "Top-1 drop per class (mean over subsets)", "class", "drop",
                 {"drop": (list(drops), list(drops.values()))}, kind="bar"),
            Plot("error_mix", "Error mix per subset (share of errors)", "subset", "share",
                 {kind: (names, [mix.get(n, {}).get(kind, float("nan")) for n in names])
                  for kind in ("bg_er", fine_error_kind(params), "other_er")}, kind="bar"),
        ]  # fmt: skip
        return SuiteOutput(metrics, table, plots)

    def _class_drops(
        self,
        subset: np.ndarray,
        target: np.ndarray,
        correct: np.ndarray,
        varied: list[str],
        params: Mapping[str, Any],
        metrics: MetricTable,
    ) -> dict[str, float]:
        """Per subset the mean and max over classes of (original top-1 - subset top-1); returns each class's drop
        averaged over the subsets (the plot)."""
        classes = sorted(set(target[subset == ORIGINAL].tolist()))
        per_class: dict[int, list[float]] = {c: [] for c in classes}
        means, maxima = [], []
        for name in varied:
            drops = []
            for c in classes:
                base, here = (subset == ORIGINAL) & (target == c), (subset == name) & (target == c)
                if here.any():
                    drops.append(float(correct[base].mean() - correct[here].mean()))
                    per_class[c].append(drops[-1])
            if drops:
                means.append(float(np.mean(drops)))
                maxima.append(float(np.max(drops)))
                metrics.add(f"{name}/class_drop_mean", means[-1], self.spec("class_drop"))
                metrics.add(f"{name}/class_drop_max", maxima[-1], self.spec("class_drop"))
        metrics.add("class_drop/mean", float(np.mean(means)) if means else float("nan"), self.spec("class_drop"))
        metrics.add("class_drop/max", float(np.max(maxima)) if maxima else float("nan"), self.spec("class_drop"))
        class_names = params["class_names"]
        return {class_names[c]: float(np.mean(v)) for c, v in per_class.items() if v}

    def _error_mix(
        self,
        subset: np.ndarray,
        target: np.ndarray,
        predicted: np.ndarray,
        rows: Mapping[str, np.ndarray],
        names: list[str],
        params: Mapping[str, Any],
        metrics: MetricTable,
    ) -> dict[str, dict[str, float]]:
        """BG-Er, (proxy) Fine-Er and other shares of each subset's errors."""
        error = np.asarray(rows["error"]).astype(str)
        if not params["error_analysis"]:
            return {}
        fine_kind = fine_error_kind(params)
        class_names = params["class_names"]
        if params.get("similar_pairs"):
            pairs = read_similar_pairs(params["similar_pairs"])
            fine = np.asarray(
                [frozenset((class_names[t], class_names[p])) in pairs for t, p in zip(target, predicted, strict=True)]
            )
        else:
            fine = np.asarray(rows["class_cosine"], dtype=np.float64) >= params["fine_er_tau"]
        degenerate = np.asarray(rows["degenerate"]).astype(bool)
        mix = {}
        for name in names:
            errors = (subset == name) & (error != "")
            count = int(errors.sum())
            bg = float((error[errors] == "bg").mean()) if count else float("nan")
            fine_share = float(((error[errors] == "fg") & fine[errors]).mean()) if count else float("nan")
            shares = {"errors": count, "bg_er": bg, fine_kind: fine_share, "other_er": 1 - bg - fine_share}
            for kind in ("bg_er", fine_kind, "other_er"):
                metrics.add(f"{name}/{kind}", shares[kind], self.spec(kind))
            mix[name] = shares
        explained = error != ""
        share = float(degenerate[explained].mean()) if explained.any() else float("nan")
        metrics.add("cci/degenerate", share, self.spec("degenerate"))
        return mix
