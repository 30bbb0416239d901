"""Zero-shot classification with class-name prompts: top-1 / top-5, clean, under each corruption and perturbation, and
robust accuracy under attacks.

A class's text embedding is the renormalized mean of its normalized template embeddings (CLIP's prompt ensemble).
Conditions: ``clean``; ``<corruption>:<severity>`` for each corruption and severity (per-sample seeded draws);
``<perturbation>:<value>`` for each value of ``robustfm.perturbations.sweep(name, perturbation_steps)``; with
``attacks``, ``apgd_ce_<norm>:<eps>``, ``apgd_t_<norm>:<eps>`` and ``attacks_<norm>:<eps>`` (robust to all of them)
on a fixed hashed subset of the images (:mod:`robustfm.evals.zero_shot_attacks`; logits scaled by the model's logit
scale). The classes are those present in the data, or all of ImageNet-1k (``label_space``,
:mod:`robustfm.evals.label_spaces`). Version 2 added the attack conditions, version 3 the label space.
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
from robustfm.evals.metrics import MetricSpec, MetricTable, mean_of, topk_correct
from robustfm.evals.suite import Plot, Suite, SuiteOutput, condition_name, resolve_names
from robustfm.evals.zero_shot_attacks import (
    ALL_ATTACKS,
    ATTACKS,
    attack_rows,
    attack_subset,
    condition,
    with_attack_subset_digest,
)
from robustfm.seeding import sample_seed

# A short subset of CLIP's ImageNet templates; ``{}`` is the class name.
CLASS_TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a good photo of a {}.", "a photo of the large {}.")


@dataclass(frozen=True)
class ZeroShotConfig:
    """Zero-shot classification with class-name prompts, clean and under corruptions and perturbations."""

    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """Labelled images (``label``, ``class_name`` columns); class names are read from the data, ordered by label."""
    templates: tuple[str, ...] = CLASS_TEMPLATES
    """Prompt templates with one ``{}`` for the class name; a class's text embedding is their normalized mean."""
    label_space: Literal["present", "imagenet1k"] = "present"
    """The classes chosen among: those the evaluated images carry, or all 1,000 ImageNet classes (the data's class
    names are then wnids or ImageNet lemmas; see :mod:`robustfm.evals.label_spaces`)."""
    corruptions: tuple[str, ...] | None = None
    """Corruptions to evaluate under (None: ``seen`` + ``unseen`` sets; empty: none, clean and perturbations only)."""
    severities: tuple[int, ...] = (3,)
    """Severities per corruption (each is its own condition)."""
    perturbations: tuple[str, ...] | None = None
    """Perturbations to evaluate under (None: every registered one; empty: none)."""
    perturbation_steps: int = 3
    """Equally spaced values per perturbation (``robustfm.perturbations.sweep``); each value is a condition."""
    attacks: tuple[str, ...] = ()
    """Attack conditions (``apgd_ce``, ``apgd_t``), each at every ``attack_eps``, plus ``attacks_<norm>:<eps>``:
    robust to all of them (auto-attack's custom ensemble, as RobustVLM evaluates). Empty: no attack, and the suite
    runs without gradients. An image is robust when classified right clean and never flipped."""
    attack_norm: Literal["linf", "l2"] = "linf"
    """Threat model of every attack condition."""
    attack_eps: tuple[float, ...] = (4 / 255,)
    """Radii in [0,1] pixel units (paper 003: Linf 2/255 = 0.00784 and 4/255 = 0.0157); each is a condition."""
    attack_steps: int = 100
    """APGD iterations per restart (and per target class of ``apgd_t``)."""
    attack_restarts: int = 1
    """Restarts of ``apgd_ce`` (paper 003: 1; auto-attack's own APGD-CE: 5)."""
    attack_target_classes: int = 9
    """``apgd_t``: the runner-up classes attacked as targets, one APGD run each (auto-attack: 9)."""
    attack_samples: int | None = 1000
    """Images attacked: the first N labelled ones ordered by a hash of their id (a fixed subset whatever the seed;
    RobustVLM's CLIP_benchmark attacks 1,000). None: all. The protocol records its size and the SHA-256 of its ids."""

    def __post_init__(self) -> None:
        check(
            len(self.templates) > 0 and all("{}" in t for t in self.templates),
            "templates",
            self.templates,
            "must be a non-empty list of strings with one '{}'",
        )
        check(all(1 <= s <= 5 for s in self.severities), "severities", self.severities, "must be in 1..5")
        check(self.perturbation_steps >= 1, "perturbation_steps", self.perturbation_steps, "must be >= 1")
        unknown = [a for a in self.attacks if a not in ATTACKS]
        check(not unknown, "attacks", self.attacks, f"must be among {ATTACKS}")
        check(len(set(self.attacks)) == len(self.attacks), "attacks", self.attacks, "must not repeat an attack")
        check(self.attack_norm in ("linf", "l2"), "attack_norm", self.attack_norm, "must be linf or l2")
        check(
            len(self.attack_eps) > 0 and all(e > 0 for e in self.attack_eps),
            "attack_eps",
            self.attack_eps,
            "must be a non-empty list of radii > 0",
        )
        check(self.attack_steps >= 1, "attack_steps", self.attack_steps, "must be >= 1")
        check(self.attack_restarts >= 1, "attack_restarts", self.attack_restarts, "must be >= 1")
        check(self.attack_target_classes >= 1, "attack_target_classes", self.attack_target_classes, "must be >= 1")
        check(
            self.attack_samples is None or self.attack_samples >= 1,
            "attack_samples",
            self.attack_samples,
            "must be >= 1 or null (all)",
        )


CLEAN = "clean"


class ZeroShotScorer(ScoringActor):
    """Cosine logits of each image against every class, clean and under every condition."""

    def setup(self) -> None:
        from robustfm.evals.class_logits import class_text_embeddings

        self.class_embeddings = class_text_embeddings(self.model, self.params["class_names"], self.params["templates"])

    def output_fields(self) -> dict[str, FieldSpec]:
        return {
            "condition": (object, ()),
            "label": (np.int64, ()),
            "logits": (np.float32, (len(self.params["class_names"]),)),
            "robust": (np.int8, ()),
            "attack_failed": (np.int8, ()),
            "zero_gradient": (np.int8, ()),
        }

    def score(self, batch: Mapping[str, np.ndarray], pixels: Any) -> list[dict[str, Any]]:
        import torch

        from robustfm.corruptions import corrupt_batch
        from robustfm.perturbations import perturb

        ids = [str(i) for i in batch["id"]]
        index_of = self.params["index_of"]
        labels = [index_of.get(int(label), -1) for label in batch["label"]]  # -1: unlabelled
        rows = self._rows(ids, labels, pixels, CLEAN)
        for corruption in self.params["corruptions"]:
            for severity in self.params["severities"]:
                seeds = [sample_seed(i, 0, f"eval_corruption/{corruption}/{severity}", self.seed) for i in ids]
                corrupted = corrupt_batch(pixels, [corruption] * len(ids), [severity] * len(ids), seeds)
                rows.extend(self._rows(ids, labels, corrupted, condition_name(corruption, severity)))
        for name, values in self.params["perturbations"].items():
            for step, value in enumerate(values):
                generators = [
                    torch.Generator().manual_seed(sample_seed(i, 0, f"eval_perturb/{name}/{step}", self.seed))
                    for i in ids
                ]
                edited = perturb(pixels, name, value, generators)
                rows.extend(self._rows(ids, labels, edited, condition_name(name, value)))
        return rows

    def _rows(self, ids: list[str], labels: list[int], pixels: Any, condition: str) -> list[dict[str, Any]]:
        logits = (self.encode_images(pixels) @ self.class_embeddings.T).cpu().numpy()
        return [
            {"id": i, "condition": condition, "label": y, "logits": z}
            for i, y, z in zip(ids, labels, logits, strict=True)
        ]


class ZeroShotAttackScorer(ZeroShotScorer):
    """:class:`ZeroShotScorer` plus the attack conditions: runs with autograd (model frozen, fp32 unless the pool asks
    for bf16); the clean and edited conditions stay gradient-free."""

    needs_gradients = True

    def score(self, batch: Mapping[str, np.ndarray], pixels: Any) -> list[dict[str, Any]]:
        import torch

        with torch.no_grad():
            rows = super().score(batch, pixels)
        index_of = self.params["index_of"]
        labels = [index_of.get(int(label), -1) for label in batch["label"]]
        ids = [str(i) for i in batch["id"]]
        scored = attack_rows(
            self.model, self.class_embeddings, pixels, ids, labels, self.params, self.seed, self.gradient_precision
        )
        return rows + scored


@SUITES.register("zero_shot", config=ZeroShotConfig)
class ZeroShotSuite(Suite):
    name = "zero_shot"
    version = "3"
    scorer = ZeroShotScorer
    columns = ("label", "class_name")
    sort_keys = ("id", "condition")
    metric_specs = (
        MetricSpec("top1", "higher", "share of images whose true class has the highest cosine logit"),
        MetricSpec("top5", "higher", "share of images whose true class is among the 5 highest cosine logits"),
        MetricSpec("top1_drop", "lower", "clean top-1 minus top-1 under the condition(s)"),
        MetricSpec(
            "robust_top1",
            "higher",
            "share of the attacked images classified right clean and at every iterate of the attack(s) (logits "
            "scaled by the model's logit scale; a row with a non-finite loss or gradient counts as not robust)",
        ),
        MetricSpec("failed", "lower", "share of the attacked images whose loss or gradient was not finite"),
        MetricSpec("zero_gradient", "lower", "share of the attacked images that met an all-zero input gradient"),
    )

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        if self.section.attacks:
            self.scorer = ZeroShotAttackScorer  # gradients only when something is attacked

    def scorer_params(self, dataset: Any) -> dict[str, Any]:
        from robustfm.corruptions import CORRUPTION_SETS, CORRUPTIONS
        from robustfm.evals.label_spaces import resolve_label_space
        from robustfm.perturbations import PERTURBATIONS, sweep

        default_corruptions = list(CORRUPTION_SETS["seen"]) + list(CORRUPTION_SETS["unseen"])
        corruptions = resolve_names(
            self.section.corruptions, default_corruptions, CORRUPTIONS, "corruption", allow_empty=True
        )
        perturbations = resolve_names(
            self.section.perturbations, PERTURBATIONS.names(), PERTURBATIONS, "perturbation", allow_empty=True
        )
        steps = self.section.perturbation_steps
        classes = class_names_by_label(dataset)
        section = self.section
        space = resolve_label_space(section.label_space, classes)
        attacked: list[str] = []
        if section.attacks:
            if "apgd_t" in section.attacks and len(classes) < 4:
                raise ValueError(f"zero_shot: apgd_t's DLR loss needs >= 4 classes, the data has {len(classes)}")
            table = dataset.select_columns(["id", "label"]).to_pandas()
            known = table["label"].isin(list(classes))
            attacked = attack_subset(table["id"].astype(str), table["label"].where(known, -1), section.attack_samples)
        return {
            "class_names": space.class_names,
            "index_of": space.index_of,
            "templates": list(self.section.templates),
            "corruptions": corruptions,
            "severities": list(self.section.severities),
            # One step evaluates the strongest end (``low``: lowest JPEG quality, ...) only when it is not identity.
            "perturbations": {p: (sweep(p, steps) if steps >= 2 else [_strongest(p)]) for p in perturbations},
            "attacks": list(section.attacks),
            "attack_norm": section.attack_norm,
            "attack_eps": [float(e) for e in section.attack_eps],
            "attack_steps": section.attack_steps,
            "attack_restarts": section.attack_restarts,
            "attack_target_classes": section.attack_target_classes,
            "attack_ids": attacked,
        }

    def protocol_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The base record, with the attacked subset as their count and the SHA-256 of their ids (not the ids)."""
        return super().protocol_params(with_attack_subset_digest(params))

    def aggregate(self, rows: Mapping[str, np.ndarray], params: Mapping[str, Any]) -> SuiteOutput:
        condition = np.asarray(rows["condition"]).astype(str)
        labels = np.asarray(rows["label"], dtype=np.int64)
        logits = np.asarray(rows["logits"], dtype=np.float64)
        num_classes = logits.shape[1]
        metrics, table = MetricTable(), []
        top1: dict[str, float] = {}
        for name in _ordered_conditions(params):
            mask = (condition == name) & (labels >= 0)  # label -1: an unlabelled row, not a wrong answer
            accuracy1 = float(topk_correct(logits[mask], labels[mask], 1).mean())
            accuracy5 = float(topk_correct(logits[mask], labels[mask], min(5, num_classes)).mean())
            top1[name] = accuracy1
            metrics.add(f"{name}/top1", accuracy1, self.spec("top1"))
            metrics.add(f"{name}/top5", accuracy5, self.spec("top5"))
            table.append({"condition": name, "n_images": int(mask.sum()), "top1": accuracy1, "top5": accuracy5})
        clean = top1[CLEAN]
        if params.get("attacks"):
            self._attack_metrics(condition, labels, logits, rows, params, metrics, table)
        corrupted = [condition_name(c, s) for c in params["corruptions"] for s in params["severities"]]
        perturbed = [condition_name(p, v) for p, values in params["perturbations"].items() for v in values]
        if corrupted:
            metrics.add("corruptions/top1_drop", clean - mean_of([top1[c] for c in corrupted]), self.spec("top1_drop"))
        if perturbed:
            metrics.add(
                "perturbations/top1_drop", clean - mean_of([top1[c] for c in perturbed]), self.spec("top1_drop")
            )
        return SuiteOutput(metrics, table, self._plots(top1, params))

    def _attack_metrics(
        self,
        names: np.ndarray,
        labels: np.ndarray,
        logits: np.ndarray,
        rows: Mapping[str, np.ndarray],
        params: Mapping[str, Any],
        metrics: MetricTable,
        table: list[dict[str, Any]],
    ) -> None:
        """Robust top-1 (and failed / zero-gradient shares) per attack condition, and clean top-1 on the subset."""
        ids = np.asarray(rows["id"]).astype(str)
        subset = (names == CLEAN) & np.isin(ids, list(params["attack_ids"])) & (labels >= 0)
        clean_subset = float(topk_correct(logits[subset], labels[subset], 1).mean()) if subset.any() else float("nan")
        metrics.add("attack_subset/top1", clean_subset, self.spec("top1"))
        table.append({"condition": "attack_subset (clean)", "n_images": int(subset.sum()), "top1": clean_subset})
        for name in _attack_conditions(params):
            mask = names == name
            robust = float(np.asarray(rows["robust"])[mask].mean()) if mask.any() else float("nan")
            failed = float(np.asarray(rows["attack_failed"])[mask].mean()) if mask.any() else float("nan")
            zero = float(np.asarray(rows["zero_gradient"])[mask].mean()) if mask.any() else float("nan")
            metrics.add(f"{name}/robust_top1", robust, self.spec("robust_top1"))
            metrics.add(f"{name}/failed", failed, self.spec("failed"))
            metrics.add(f"{name}/zero_gradient", zero, self.spec("zero_gradient"))
            table.append({"condition": name, "n_images": int(mask.sum()), "robust_top1": robust, "failed": failed})

    def _plots(self, top1: Mapping[str, float], params: Mapping[str, Any]) -> list[Plot]:
        plots = []
        if params["corruptions"]:
            names = [condition_name(c, s) for c in params["corruptions"] for s in params["severities"]]
            plots.append(
                Plot(
                    "top1_corruptions",
                    "Zero-shot top-1 under corruptions",
                    "condition",
                    "top-1",
                    {"top-1": ([CLEAN, *names], [top1[CLEAN], *[top1[n] for n in names]])},
                    kind="bar",
                )
            )
        for name, values in params["perturbations"].items():
            if len(values) > 1:
                plots.append(
                    Plot(
                        f"top1_vs_{name}",
                        f"Zero-shot top-1 vs {name}",
                        name,
                        "top-1",
                        {"top-1": (list(values), [top1[condition_name(name, v)] for v in values])},
                    )
                )
        return plots


def _attack_conditions(params: Mapping[str, Any]) -> list[str]:
    norm = params["attack_norm"]
    return [condition(a, norm, eps) for eps in params["attack_eps"] for a in [*params["attacks"], ALL_ATTACKS]]


def _ordered_conditions(params: Mapping[str, Any]) -> list[str]:
    names = [CLEAN]
    names += [condition_name(c, s) for c in params["corruptions"] for s in params["severities"]]
    names += [condition_name(p, v) for p, values in params["perturbations"].items() for v in values]
    return names


def _strongest(name: str) -> float:
    from robustfm.perturbations import perturbation_meta

    meta = perturbation_meta(name)
    # The end of the range farther from identity is the strongest edit.
    return meta["low"] if abs(meta["low"] - meta["identity"]) >= abs(meta["high"] - meta["identity"]) else meta["high"]


def class_names_by_label(dataset: Any) -> dict[int, str]:
    """``{label: class name}`` of the classes present in the data, in label order.

    The candidate classes are those the evaluated images carry: on a subset (``max_samples``) of a labelled set, the
    protocol's sample-id hash pins which classes those are.

    Raises:
        ValueError: one label carries two names, or no image has a label.
    """
    table = dataset.select_columns(["label", "class_name"]).to_pandas().drop_duplicates()
    names: dict[int, str] = {}
    for label, name in zip(table["label"], table["class_name"], strict=True):
        label = int(label)
        if label < 0:
            continue
        if names.setdefault(label, str(name)) != str(name):
            raise ValueError(f"zero_shot: label {label} has two class names, {names[label]!r} and {name!r}")
    if not names:
        raise ValueError("zero_shot: no image carries a label (column 'label' >= 0)")
    return dict(sorted(names.items()))
