"""Classification accuracy over ImageNet-1k or the classes present: top-1 / top-5, split by train and held-out classes.

The robustness benchmarks of paper 001 (spec §1.3) are folders of images whose names say the class in different ways:
ImageNet-A/-R/-Sketch by WordNet id, ImageNet-V2 by class index ("0".."999"), ObjectNet and SI-Score through a
mapping file. ``image_folder`` shards label them 0..N-1 by sorted folder name (spec fact 7), so this suite maps each
image's ``class_name`` onto ImageNet-1k (:mod:`robustfm.evals.label_spaces`) instead of trusting the label.

- Logits: a classifier's own head (1,000 outputs under ``imagenet1k``), or a CLIP model's zero-shot classifier over the
  label space (:class:`robustfm.evals.class_logits.ClassLogits`).
- ``logit_subset``: the argmax (and top-5) over ImageNet-A's or -R's 200 classes only, as their papers score a
  1000-way model; ``all`` is the CFT code's full 1000-way argmax. An image whose class lies outside the subset is
  skipped and counted (``outside_logit_subset``).
- ``match``: ``primary`` (an image is right when the prediction is its class's first mapped index: the CFT code's
  ObjectNet rule) or ``any`` (any of its mapped indices: the usual ObjectNet rule).
- ``train_classes``: a file of the WordNet ids a model was fine-tuned on (the CFT recipe saves one); top-1/top-5 are
  then also reported for images of those classes (``train/``) and of the others (``held_out/``), by each image's
  primary class (paper 001 Table 4).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from robustfm.config.core import check
from robustfm.evals import SUITES
from robustfm.evals.actors import FieldSpec, ScoringActor
from robustfm.evals.config import EvalDataConfig
from robustfm.evals.metrics import MetricSpec, MetricTable
from robustfm.evals.suite import Suite, SuiteOutput
from robustfm.evals.suites.zero_shot import CLASS_TEMPLATES, class_names_by_label

SECTION = "eval.suites.classification"
TOP_K = 5
#: Status of an image whose (primary) class the logit subset cannot predict.
OUTSIDE_SUBSET = "outside_logit_subset"


@dataclass(frozen=True)
class ClassificationConfig:
    """Top-1 / top-5 classification over a label space, with ImageNet-A/-R logit subsets and ObjectNet-style maps."""

    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """Labelled images (``label``, ``class_name`` columns): an ``image_folder`` of wnid, index or named folders."""
    label_space: Literal["present", "imagenet1k"] = "imagenet1k"
    """``imagenet1k``: the 1,000 ImageNet classes, data classes named by wnid, class index or lemma, or mapped by
    ``class_map``; ``present``: the classes the data carries (a classifier's labels are then its head's indices)."""
    class_map: str | None = None
    """CSV or JSON file: data class name -> one or more ImageNet classes (index, wnid or lemma), the first one primary
    (ObjectNet, SI-Score; format in ``robustfm.evals.label_spaces.read_class_map``)."""
    unmapped: Literal["error", "skip"] = "error"
    """A data class that maps to no ImageNet class: fail naming it, or skip its images (counted as ``unmapped``;
    ObjectNet's 200 classes outside ImageNet)."""
    logit_subset: Literal["all", "imagenet_a", "imagenet_r"] = "all"
    """Restrict the argmax to ImageNet-A's or -R's 200 classes (timm's index lists), or use all 1,000."""
    match: Literal["primary", "any"] = "primary"
    """Right when the prediction is the class's first mapped index (``primary``) or any of them (``any``)."""
    train_classes: str | None = None
    """File of the wnids the model was fine-tuned on (text, one per line, or a JSON list): metrics split by train and
    held-out classes. None: no split."""
    templates: tuple[str, ...] = CLASS_TEMPLATES
    """CLIP prompt templates of the zero-shot classifier (classifiers ignore them)."""

    def __post_init__(self) -> None:
        check(self.label_space in ("present", "imagenet1k"), "label_space", self.label_space,
              "must be present or imagenet1k")  # fmt: skip
        check(self.unmapped in ("error", "skip"), "unmapped", self.unmapped, "must be error or skip")
        check(self.logit_subset in ("all", "imagenet_a", "imagenet_r"), "logit_subset", self.logit_subset,
              "must be all, imagenet_a or imagenet_r")  # fmt: skip
        check(self.match in ("primary", "any"), "match", self.match, "must be primary or any")
        check(len(self.templates) > 0 and all("{}" in t for t in self.templates), "templates", self.templates,
              "must be a non-empty list of strings with one '{}'")  # fmt: skip
        # Subsets, maps and wnid lists all name ImageNet-1k classes: they mean nothing over the present classes.
        for name in ("class_map", "train_classes"):
            value = getattr(self, name)
            check(value is None or self.label_space == "imagenet1k", name, value, "needs label_space imagenet1k")
        check(self.logit_subset == "all" or self.label_space == "imagenet1k", "logit_subset", self.logit_subset,
              "needs label_space imagenet1k")  # fmt: skip


class ClassificationScorer(ScoringActor):
    """The top-5 predictions of each labelled image over the label space (restricted to the logit subset)."""

    def setup(self) -> None:
        import torch

        from robustfm.evals.class_logits import ClassLogits, is_clip

        params = self.params
        imagenet = params["label_space"] == "imagenet1k"
        clip = is_clip(self.model)
        outputs = len(params["class_names"]) if clip else int(getattr(self.model, "num_classes", 0))
        if imagenet and outputs != len(params["class_names"]):
            raise ValueError(
                f"{SECTION}.label_space = imagenet1k needs a classifier with {len(params['class_names'])} outputs in "
                f"ImageNet-1k order; this model has {outputs}"
            )
        self.classes = ClassLogits(
            self.model, params["class_names"], params["templates"], params["index_of"], head_indexed=not imagenet
        )
        # A classifier over the present classes is scored on its own head: the data's labels are its indices.
        head = not imagenet and not clip
        self.targets_of = {
            int(label): ([int(label)] if head else [int(i) for i in indices])
            for label, indices in params["all_indices_of"].items()
        }
        subset = params["logit_subset"]
        self.allowed = None
        if subset is not None:
            self.allowed = torch.zeros(outputs, dtype=torch.bool, device=self.device)
            self.allowed[torch.tensor(subset, device=self.device)] = True

    def output_fields(self) -> dict[str, FieldSpec]:
        return {
            "label": (np.int64, ()),
            "target": (np.int64, ()),
            "targets": (np.int64, (self.params["max_targets"],)),
            "top5": (np.int64, (TOP_K,)),
        }

    def score(self, batch: Mapping[str, np.ndarray], pixels: Any) -> list[dict[str, Any]]:
        import torch

        ids = [str(i) for i in batch["id"]]
        labels = [int(y) for y in batch["label"]]
        rows: list[dict[str, Any]] = []
        keep: list[int] = []
        for row, label in enumerate(labels):
            targets = self.targets_of.get(label)
            if targets is None:
                rows.append({"id": ids[row], "status": "unlabelled" if label < 0 else "unmapped"})
            elif self.allowed is not None and not bool(self.allowed[targets[0]]):
                rows.append({"id": ids[row], "status": OUTSIDE_SUBSET})
            else:
                keep.append(row)
        if not keep:
            return rows
        logits = self.classes(pixels[keep])
        if self.allowed is not None:
            logits = logits.masked_fill(~self.allowed, float("-inf"))
        # A stable descending sort breaks ties by the lower class index, as metrics.topk_correct does: an image's
        # prediction never depends on the batch it came in.
        order = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :TOP_K]
        available = logits.shape[1] if self.allowed is None else int(self.allowed.sum())
        order[:, available:] = -1
        top5 = torch.nn.functional.pad(order, (0, TOP_K - order.shape[1]), value=-1).cpu().numpy()
        width = self.params["max_targets"]
        for position, row in enumerate(keep):
            targets = self.targets_of[labels[row]]
            padded = np.full(width, -1, dtype=np.int64)
            padded[: len(targets)] = targets
            rows.append({"id": ids[row], "label": labels[row], "target": targets[0], "targets": padded,
                         "top5": top5[position]})  # fmt: skip
        return rows


@SUITES.register("classification", config=ClassificationConfig)
class ClassificationSuite(Suite):
    name = "classification"
    version = "1"
    scorer = ClassificationScorer
    columns = ("label", "class_name")
    # Its data is a benchmark whose folders name ImageNet classes: neither synthetic rows nor a recipe's training
    # shards (``with_eval_data``) carry such names, so ``--suite all`` runs it only once its shards are set.
    needs_shards = True
    metric_specs = (
        MetricSpec("top1", "higher", "share of images whose highest logit (within the logit subset) is their class"),
        MetricSpec("top5", "higher", "share of images whose class is among the 5 highest logits (within the subset)"),
    )

    @classmethod
    def settings_problems(cls, section: ClassificationConfig) -> list[str]:
        """The class map and the train-class list must read and name ImageNet-1k classes, and every class of the
        data split must map onto the label space (its ``label`` / ``class_name`` columns, read without Ray)."""
        from robustfm.evals.label_spaces import read_class_map, read_wnid_list

        problems = []
        files = {}
        for name, read in (("class_map", read_class_map), ("train_classes", read_wnid_list)):
            path = getattr(section, name)
            if path is None:
                continue
            if not Path(path).is_file():
                problems.append(f"{SECTION}.{name}: {path!r} does not exist")
                continue
            try:
                files[name] = read(path)
            except ValueError as err:
                problems.append(f"{SECTION}.{name}: {err}")
        if section.data.shards and section.label_space == "imagenet1k" and not problems:
            problems.extend(_data_class_problems(section, files.get("class_map")))
        return problems

    def scorer_params(self, dataset: Any) -> dict[str, Any]:
        from robustfm.evals.label_spaces import logit_subset, read_class_map, read_wnid_list, resolve_label_space

        section = self.section
        class_map = read_class_map(section.class_map) if section.class_map else None
        present = class_names_by_label(dataset)
        try:
            space = resolve_label_space(section.label_space, present, class_map=class_map, unmapped=section.unmapped)
        except ValueError as err:
            raise ValueError(f"{SECTION}: {err}") from err
        train = read_wnid_list(section.train_classes) if section.train_classes else None
        return {
            "class_names": space.class_names,
            "index_of": space.index_of,
            "all_indices_of": space.all_indices_of,
            "max_targets": max((len(v) for v in space.all_indices_of.values()), default=1),
            "data_classes": {int(label): name for label, name in present.items()},
            "unmapped_classes": space.unmapped,
            "label_space": section.label_space,
            "templates": list(section.templates),
            "logit_subset": logit_subset(section.logit_subset) if section.label_space == "imagenet1k" else None,
            "match": section.match,
            "train_indices": train,
        }

    def protocol_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The base record, with class counts instead of the 1,000 names and the subset's size."""
        record = {k: v for k, v in params.items() if k not in ("class_names", "index_of", "logit_subset")}
        record["classes"] = len(params["class_names"])
        record["logit_subset_size"] = None if params["logit_subset"] is None else len(params["logit_subset"])
        record["train_classes"] = None if params["train_indices"] is None else len(params["train_indices"])
        record.pop("train_indices")
        return super().protocol_params(record)

    @classmethod
    def summary_columns(cls, params: Mapping[str, Any]) -> dict[str, str]:
        columns = {"top-1": "top1", "top-5": "top5"}
        if params.get("train_indices") is not None:
            columns.update({"train top-1": "train/top1", "held-out top-1": "held_out/top1"})
        return columns

    def aggregate(self, rows: Mapping[str, np.ndarray], params: Mapping[str, Any]) -> SuiteOutput:
        target = np.asarray(rows["target"], dtype=np.int64)
        top5 = np.asarray(rows["top5"], dtype=np.int64)
        correct1, correct5 = correct_at(top5, target, np.asarray(rows["targets"], dtype=np.int64), params["match"])
        groups = {"all": np.ones(len(target), dtype=bool)}
        if params.get("train_indices") is not None:
            trained = np.isin(target, np.asarray(params["train_indices"], dtype=np.int64))
            groups.update({"train": trained, "held_out": ~trained})
        metrics, table = MetricTable(), []
        for group, chosen in groups.items():
            top1 = float(correct1[chosen].mean()) if chosen.any() else float("nan")
            top5_share = float(correct5[chosen].mean()) if chosen.any() else float("nan")
            prefix = "" if group == "all" else f"{group}/"
            metrics.add(f"{prefix}top1", top1, self.spec("top1"))
            metrics.add(f"{prefix}top5", top5_share, self.spec("top5"))
            table.append({"group": group, "n_images": int(chosen.sum()), "top1": top1, "top5": top5_share})
        # Per data class (an ObjectNet folder, an ImageNet-V2 index), with the ImageNet class it maps to first.
        labels = np.asarray(rows["label"], dtype=np.int64)
        data_classes = {int(k): v for k, v in params["data_classes"].items()}
        for label in np.unique(labels):
            chosen = labels == label
            table.append({"group": "class", "class": data_classes.get(int(label), str(label)),
                          "target": int(target[chosen][0]), "n_images": int(chosen.sum()),
                          "top1": float(correct1[chosen].mean()), "top5": float(correct5[chosen].mean())})  # fmt: skip
        return SuiteOutput(metrics, table)


def _data_class_problems(section: ClassificationConfig, class_map: Mapping[str, list[int]] | None) -> list[str]:
    """Why the split's classes (every class of the split, before ``max_samples``) do not map onto ImageNet-1k."""
    from robustfm.data.shards import Location, list_split
    from robustfm.evals.label_spaces import resolve_label_space

    data = section.data
    try:
        rows = list_split(Location(data.shards), data.split).read_rows(["label", "class_name"])
        present = {int(y): str(n) for y, n in zip(rows["label"], rows["class_name"], strict=True) if int(y) >= 0}
        resolve_label_space("imagenet1k", dict(sorted(present.items())), class_map=class_map,
                            unmapped=section.unmapped)  # fmt: skip
    except (ValueError, OSError) as err:
        return [f"{SECTION} (data {data.shards!r} split {data.split!r}): {err}"]
    return []


def correct_at(top5: np.ndarray, target: np.ndarray, targets: np.ndarray, match: str) -> tuple[np.ndarray, np.ndarray]:
    """Per image, whether the top-1 and the top-5 predictions hit its class.

    Args:
        top5: ``(N, 5)`` predicted indices, best first (-1: no prediction).
        target: ``(N,)`` primary class index.
        targets: ``(N, M)`` every mapped index, padded with -1.
        match: ``primary`` (only ``target`` counts) or ``any`` (any of ``targets``).
    """
    if match == "primary":
        return top5[:, 0] == target, (top5 == target[:, None]).any(axis=1)
    valid = targets >= 0
    hits = (top5[:, :, None] == targets[:, None, :]) & valid[:, None, :]
    return hits[:, 0].any(axis=1), hits.any(axis=(1, 2))
