"""Clean-vs-corrupted detection from image embeddings (CG-CLIP, paper 000, appendix A.2).

Each image is scored clean and once per corruption, at a severity drawn from the image's seed. Two detectors read
the L2-normalized image embeddings:

- **zero-shot**: P(corrupt) is the softmax over the cosine logits (times the model's logit scale) of the mean
  "clean" and the mean "corrupt" prompt embeddings;
- **linear probe** (:class:`robustfm.evals.probe.LinearProbe`, balanced classes): fitted on the embeddings of a
  train split of the images (their clean versions and their corrupted versions under the ``probe_train_set``
  corruptions) and tested on the other images, so no test image was seen in any form; or fitted on every image of
  one data set and saved (``probe: fit``), then applied unchanged to another (``probe: load``: in domain -> out of
  domain, as paper 000 measures transfer).

Accuracy / AUROC / F1 are reported over all test rows, per corruption, per severity and per corruption set (seen
vs unseen): each subset is the clean versions of the test images plus their corrupted versions in the subset. The
``all`` and set subsets hold one clean against several corrupted versions per image: the clean rows are re-weighted
so both classes count alike (paper 000's accuracy, F1 and AUROC agree, i.e. balanced sets); per-corruption subsets
are balanced by construction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from robustfm.config.core import check
from robustfm.evals import SUITES
from robustfm.evals.actors import FieldSpec, ScoringActor
from robustfm.evals.config import EvalDataConfig
from robustfm.evals.metrics import MetricSpec, MetricTable, detection_metrics, two_prompt_probability
from robustfm.evals.suite import Plot, Suite, SuiteOutput, resolve_names
from robustfm.seeding import sample_seed

# Object-agnostic prompts of CG-CLIP (paper 000, stage 1); lists so that more phrasings can be averaged.
CLEAN_PROMPTS = ("a clean photograph", "a clean photo", "a sharp, undistorted photo")
CORRUPT_PROMPTS = ("a corrupt photograph", "a corrupted photo", "a noisy, blurry or distorted photo")


@dataclass(frozen=True)
class CorruptionDetectionConfig:
    """Clean-vs-corrupted detection from image embeddings (CG-CLIP's evaluation, appendix A.2)."""

    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """Images to corrupt; each is scored clean and once per corruption."""
    corruptions: tuple[str, ...] | None = None
    """Corruptions to apply (None: the ``seen`` then ``unseen`` sets of ``robustfm.corruptions.CORRUPTION_SETS``)."""
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    """Severities drawn per (image, corruption) from the sample's seed, uniformly."""
    clean_prompts: tuple[str, ...] = CLEAN_PROMPTS
    """Zero-shot prompts of the "clean" class (their normalized text embeddings are averaged)."""
    corrupt_prompts: tuple[str, ...] = CORRUPT_PROMPTS
    """Zero-shot prompts of the "corrupt" class."""
    probe: Literal["split", "fit", "load"] = "split"
    """How the linear probe is obtained. ``split``: fitted on ``probe_train_fraction`` of these images (by a hash of
    their id) and tested on the rest. ``fit``: fitted on every image here and saved to ``probe_path`` (no probe
    metrics: a recipe fits it in domain once). ``load``: the probe saved at ``probe_path`` applied unchanged to every
    image here (paper 000's out-of-domain protocol: the probe trained in domain, tested as it is)."""
    probe_path: str | None = None
    """Where ``fit`` saves and ``load`` reads the probe (``.npz``, on the machine that aggregates: the driver)."""
    probe_train_fraction: float = 0.5
    """``split``: images (by a hash of their id) whose clean and corrupted embeddings train the probe."""
    probe_train_set: str = "seen"
    """Which corruptions the probe sees in training: a ``CORRUPTION_SETS`` name or ``all`` (tests use every one)."""
    probe_c: float = 1.0
    """Inverse L2 regularization of the logistic-regression probe."""
    threshold: float = 0.5
    """Decision threshold on P(corrupt) for accuracy and F1 (AUROC is threshold-free)."""

    def __post_init__(self) -> None:
        check(
            len(self.severities) > 0 and all(1 <= s <= 5 for s in self.severities),
            "severities",
            self.severities,
            "must be a non-empty list of values in 1..5",
        )
        check(len(self.clean_prompts) > 0, "clean_prompts", self.clean_prompts, "must not be empty")
        check(len(self.corrupt_prompts) > 0, "corrupt_prompts", self.corrupt_prompts, "must not be empty")
        check(0 < self.probe_train_fraction < 1, "probe_train_fraction", self.probe_train_fraction, "must be in (0, 1)")
        check(
            self.probe == "split" or self.probe_path is not None,
            "probe_path",
            self.probe_path,
            f"must name a .npz file when probe is {self.probe!r}",
        )
        check(self.probe_c > 0, "probe_c", self.probe_c, "must be positive")
        check(0 < self.threshold < 1, "threshold", self.threshold, "must be in (0, 1)")


CLEAN = "clean"


def drawn_severity(sample_id: str, corruption: str, severities: list[int], seed: int) -> int:
    """The severity an image gets under ``corruption``: uniform over ``severities``, fixed by the sample's seed."""
    return severities[sample_seed(sample_id, 0, f"eval_severity/{corruption}", seed) % len(severities)]


def in_probe_train_split(sample_id: str, fraction: float, seed: int) -> bool:
    """Whether an image's embeddings train the probe (a hash of its id, so the split never depends on order)."""
    return sample_seed(sample_id, 0, "eval_probe_split", seed) / 2.0**63 < fraction


@dataclass(frozen=True)
class ZeroShotDetector:
    """The zero-shot clean-vs-corrupted detector of a CLIP model: P(corrupt) is the softmax over the model's own
    logit scale times the cosines to the mean "clean" and mean "corrupt" prompt embeddings (prompt ensembles: mean of
    normalized embeddings, renormalized, CLIP's recipe). The suite's scorer and a recipe's in-loop validation both
    use it, so a sweep's validation AUROC and a milestone's measure the same thing."""

    clean_text: np.ndarray
    corrupt_text: np.ndarray
    logit_scale: float

    @classmethod
    def of(cls, model: Any, clean_prompts: Sequence[str], corrupt_prompts: Sequence[str]) -> ZeroShotDetector:
        """Encode the prompts with ``model`` (a ClipModel) and read its temperature, without gradients."""
        import torch

        with torch.no_grad():
            clean = model.encode_text(list(clean_prompts), normalize=True).double().mean(0).cpu().numpy()
            corrupt = model.encode_text(list(corrupt_prompts), normalize=True).double().mean(0).cpu().numpy()
            scale = float(model.logit_scale.detach().exp().reshape(-1)[0])
        return cls(clean / np.linalg.norm(clean), corrupt / np.linalg.norm(corrupt), scale)

    def p_corrupt(self, embeddings: np.ndarray) -> np.ndarray:
        """P(corrupt) of L2-normalized image embeddings ``(N, E)``."""
        return two_prompt_probability(
            np.asarray(embeddings, dtype=np.float64), self.clean_text, self.corrupt_text, self.logit_scale
        )


class CorruptionDetectionScorer(ScoringActor):
    """Embeds each image clean and under every corruption; adds the zero-shot P(corrupt) of each embedding."""

    def setup(self) -> None:
        self.detector = ZeroShotDetector.of(self.model, self.params["clean_prompts"], self.params["corrupt_prompts"])

    def output_fields(self) -> dict[str, FieldSpec]:
        return {
            "corruption": (object, ()),
            "severity": (np.int64, ()),
            "embedding": (np.float32, (self.model.embed_dim,)),
            "p_corrupt": (np.float64, ()),
        }

    def score(self, batch: Mapping[str, np.ndarray], pixels: Any) -> list[dict[str, Any]]:
        from robustfm.corruptions import corrupt_batch

        ids = [str(i) for i in batch["id"]]
        rows = self._rows(ids, pixels, CLEAN, [0] * len(ids))
        for corruption in self.params["corruptions"]:
            severities = [drawn_severity(i, corruption, self.params["severities"], self.seed) for i in ids]
            seeds = [sample_seed(i, 0, f"eval_corruption/{corruption}", self.seed) for i in ids]
            corrupted = corrupt_batch(pixels, [corruption] * len(ids), severities, seeds)
            rows.extend(self._rows(ids, corrupted, corruption, severities))
        return rows

    def _rows(self, ids: list[str], pixels: Any, corruption: str, severities: list[int]) -> list[dict[str, Any]]:
        embeddings = self.encode_images(pixels).cpu().numpy()
        p_corrupt = self.detector.p_corrupt(embeddings)
        return [
            {"id": i, "corruption": corruption, "severity": s, "embedding": e, "p_corrupt": p}
            for i, s, e, p in zip(ids, severities, embeddings, p_corrupt, strict=True)
        ]


@SUITES.register("corruption_detection", config=CorruptionDetectionConfig)
class CorruptionDetectionSuite(Suite):
    name = "corruption_detection"
    version = "2"
    scorer = CorruptionDetectionScorer
    sort_keys = ("id", "corruption")
    metric_specs = (
        MetricSpec(
            "accuracy",
            "higher",
            "balanced accuracy at P > threshold: clean rows weighted to count as much as corrupted ones",
        ),
        MetricSpec("auroc", "higher", "area under the ROC curve of P(corrupt), clean = 0, corrupted = 1 (sklearn)"),
        MetricSpec("f1", "higher", "F1 of the 'corrupted' class at P > threshold, clean rows re-weighted as above"),
    )

    def scorer_params(self, dataset: Any) -> dict[str, Any]:
        from robustfm.corruptions import CORRUPTION_SETS, CORRUPTIONS

        default = list(CORRUPTION_SETS["seen"]) + list(CORRUPTION_SETS["unseen"])
        corruptions = resolve_names(self.section.corruptions, default, CORRUPTIONS, "corruption")
        probe_set = self.section.probe_train_set
        if probe_set != "all" and probe_set not in CORRUPTION_SETS:
            raise ValueError(
                f"corruption_detection.probe_train_set {probe_set!r} is not 'all' or one of {sorted(CORRUPTION_SETS)}"
            )
        sets = {name: [c for c in corruptions if c in CORRUPTION_SETS[name]] for name in ("seen", "unseen")}
        probe_train = corruptions if probe_set == "all" else [c for c in corruptions if c in CORRUPTION_SETS[probe_set]]
        if not probe_train:
            raise ValueError(f"corruption_detection: none of {corruptions} is in probe_train_set {probe_set!r}")
        return {
            "corruptions": corruptions,
            "severities": list(self.section.severities),
            "clean_prompts": list(self.section.clean_prompts),
            "corrupt_prompts": list(self.section.corrupt_prompts),
            "sets": sets,
            "probe_train_corruptions": probe_train,
        }

    def aggregate(self, rows: Mapping[str, np.ndarray], params: Mapping[str, Any]) -> SuiteOutput:
        from robustfm.evals.probe import LinearProbe

        ids = np.asarray(rows["id"]).astype(str)
        corruption = np.asarray(rows["corruption"]).astype(str)
        severity = np.asarray(rows["severity"])
        labels = (corruption != CLEAN).astype(np.int64)
        embeddings = np.asarray(rows["embedding"], dtype=np.float64)
        section = self.section
        if section.probe == "split":
            train = np.array([in_probe_train_split(i, section.probe_train_fraction, self.cfg.seed) for i in ids])
        else:
            train = np.zeros(len(ids), dtype=bool)  # fit: training-set numbers are not test numbers; load: all test
        fit_rows = (train if section.probe == "split" else np.ones(len(ids), dtype=bool)) & (
            (corruption == CLEAN) | np.isin(corruption, params["probe_train_corruptions"])
        )
        scores = {"zero_shot": np.asarray(rows["p_corrupt"], dtype=np.float64)}
        if section.probe == "load":
            scores["probe"] = LinearProbe.load(section.probe_path, embeddings.shape[1]).predict(embeddings)
        else:
            if len(np.unique(labels[fit_rows])) < 2 or (section.probe == "split" and not (~train).any()):
                raise ValueError(
                    f"corruption_detection: {len(np.unique(ids))} images are too few to split into probe "
                    "train and test sets with both classes; use more samples"
                )
            probe = LinearProbe.fit(embeddings[fit_rows], labels[fit_rows], section.probe_c)
            if section.probe == "fit":
                probe.save(section.probe_path)
            else:
                scores["probe"] = probe.predict(embeddings)

        # Every subset is the test images' clean versions plus their corrupted versions in the subset; the clean
        # rows are re-weighted to count as much as the corrupted ones (balanced accuracy and F1; a detector that
        # calls everything corrupted scores 0.5 on the 1:9 seen and unseen sets, not 0.9).
        test_clean = ~train & (corruption == CLEAN)
        subsets: dict[str, np.ndarray] = {"all": ~train}
        subsets.update(
            {
                f"set/{name}": test_clean | (~train & np.isin(corruption, members))
                for name, members in params["sets"].items()
                if members
            }
        )
        subsets.update({f"corruption/{c}": test_clean | (~train & (corruption == c)) for c in params["corruptions"]})
        subsets.update(
            {
                f"severity/{s}": test_clean | (~train & (severity == s))
                for s in params["severities"]
                if (~train & (severity == s)).any()
            }
        )

        metrics, table = MetricTable(), []
        for detector, detector_scores in scores.items():
            for subset, mask in subsets.items():
                values = detection_metrics(labels[mask], detector_scores[mask], section.threshold, balanced=True)
                for family, value in values.items():
                    metrics.add(f"{detector}/{subset}/{family}", value, self.spec(family))
                table.append({"detector": detector, "subset": subset, "n_rows": int(mask.sum()), **values})
        return SuiteOutput(metrics, table, self._plots(table, params))

    def _plots(self, table: list[dict[str, Any]], params: Mapping[str, Any]) -> list[Plot]:
        plots = []
        for prefix, title in (("corruption/", "per corruption"), ("severity/", "per severity")):
            series = {}
            for detector in sorted({r["detector"] for r in table}):
                chosen = [r for r in table if r["detector"] == detector and r["subset"].startswith(prefix)]
                series[detector] = ([r["subset"][len(prefix) :] for r in chosen], [r["auroc"] for r in chosen])
            kind = "bar" if prefix == "corruption/" else "line"
            plots.append(
                Plot(
                    f"auroc_{prefix[:-1]}",
                    f"Corruption detection AUROC {title}",
                    prefix[:-1],
                    "AUROC",
                    series,
                    kind=kind,
                )
            )
        return plots
