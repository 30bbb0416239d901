"""Relevance alignment: how well a model's relevance maps segment the object (paper 001 §4.3 Table 3, spec §1.3).

For every image with a foreground ``mask`` and every chosen relevance method (``robustfm.explain.RELEVANCE`` entries,
and ``random`` as the floor) the map of the target class (the model's prediction, as Chefer et al.'s
ImageNet-Segmentation evaluation takes it, or the image's label) is upsampled bilinearly to the image and min-max
normalised (:func:`robustfm.explain.relevance.to_pixels`), then scored as a two-class segmentation by
:mod:`robustfm.evals.segmentation_metrics`: pixel accuracy and mIoU accumulated over the set with the map thresholded
at its mean, and the mean over images of the one-hot AP (mAP).

Geometry: ``stretch`` (default) resizes the whole image to the model's square input, the mask nearest, with no crop,
as the reference protocol does; ``center_crop`` uses the platform's eval transform (the centred square) on both.
Images whose mask is empty or full (no background or no object to find), missing, unreadable or of another size than
the image are skipped and counted by reason, as ``covar`` does. A constant map (all zeros after min-max) is scored
(all background) and its share reported per method.

CLIP models are explained through their zero-shot classifier (the score is the cosine with the target's class text
embedding; predictions over the label space), classifiers through their own logits.
"""

from __future__ import annotations

import io
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
from robustfm.seeding import sample_seed

SECTION = "eval.suites.relevance_alignment"
RANDOM = "random"
SCORES = ("pixel_accuracy", "miou", "map", "iou_foreground", "iou_background")


def known_methods() -> tuple[str, ...]:
    """Every registered relevance method, and ``random``."""
    from robustfm.explain.relevance import RELEVANCE

    return (*RELEVANCE.names(), RANDOM)


@dataclass(frozen=True)
class RelevanceAlignmentConfig:
    """Relevance maps scored against foreground masks by the ImageNet-Segmentation protocol (PA, mIoU, mAP)."""

    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """Images with a foreground ``mask`` column (``label`` and ``class_name`` too for ``target: label`` or
    ``label_space: present``)."""
    methods: tuple[str, ...] = ("attnlrp", "gae", RANDOM)
    """Relevance methods (``robustfm.explain.RELEVANCE`` names) and ``random`` (a seeded uniform map: the floor).
    Paper 001 uses AttnLRP; the CFT code's maps are ``gae``."""
    target: Literal["prediction", "label"] = "prediction"
    """The class explained: the model's prediction (Chefer et al.'s protocol; ImageNet-Segmentation has no labels)
    or the image's label."""
    label_space: Literal["present", "imagenet1k"] = "imagenet1k"
    """Classes of the prediction and of the labels (``robustfm.evals.label_spaces``); a classifier predicts over its
    own head either way."""
    class_map: str | None = None
    """``imagenet1k`` with ``target: label``: data class name -> ImageNet classes, the first one explained."""
    templates: tuple[str, ...] = CLASS_TEMPLATES
    """CLIP prompt templates of the zero-shot classifier (classifiers ignore them)."""
    geometry: Literal["stretch", "center_crop"] = "stretch"
    """Image and mask to the model's input: resized whole (the reference protocol) or the centred square."""

    def __post_init__(self) -> None:
        # Method names are checked before Ray (settings_problems): their registry imports torch, configs do not.
        check(len(self.methods) > 0, "methods", self.methods, "must name at least one method")
        check(len(set(self.methods)) == len(self.methods), "methods", self.methods, "must not repeat a method")
        check(self.target in ("prediction", "label"), "target", self.target, "must be prediction or label")
        check(self.geometry in ("stretch", "center_crop"), "geometry", self.geometry, "must be stretch or center_crop")
        check(len(self.templates) > 0 and all("{}" in t for t in self.templates), "templates", self.templates,
              "must be a non-empty list of strings with one '{}'")  # fmt: skip
        check(self.class_map is None or self.label_space == "imagenet1k", "class_map", self.class_map,
              "needs label_space imagenet1k")  # fmt: skip


def _whole(width: int, height: int) -> tuple[float, float, float, float]:
    return (0, 0, width, height)


def alignment_inputs(image: bytes, mask: Any, size: int, geometry: str, sample: str) -> tuple[Any, Any, str | None]:
    """The float pixels ``(3, size, size)`` (None under ``center_crop``: the actor's own) and the {0,1} mask
    ``(size, size)`` of one row, or a skip reason: ``mask_missing``, ``mask_invalid``, ``mask_size`` (stored sizes
    differ), ``empty_mask`` / ``full_mask`` (nothing to segment)."""
    from PIL import Image

    from robustfm.data.images import ImageDecodeError, decode_crop_resize
    from robustfm.data.masks import decode_mask_crop_resize
    from robustfm.data.transforms import center_box
    from robustfm.evals.covar_inputs import foreground

    if mask is None or len(mask) == 0:
        return None, None, "mask_missing"
    box = _whole if geometry == "stretch" else center_box
    try:
        with Image.open(io.BytesIO(bytes(image))) as stored_image, Image.open(io.BytesIO(bytes(mask))) as stored:
            if stored_image.size != stored.size:
                return None, None, "mask_size"
        values = decode_mask_crop_resize(bytes(mask), box, size, f"sample {sample} mask")
    except (ImageDecodeError, OSError):
        return None, None, "mask_invalid"
    binary = foreground(values)
    if binary.sum() == 0:
        return None, None, "empty_mask"
    if binary.sum() == binary.size:
        return None, None, "full_mask"
    pixels = None
    if geometry == "stretch":
        decoded = decode_crop_resize(bytes(image), box, size, f"sample {sample}")
        pixels = np.ascontiguousarray(decoded.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)
    return pixels, binary, None


class RelevanceAlignmentScorer(ScoringActor):
    """Each method's map of each image's target class, scored against its mask (per-image counts and AP)."""

    needs_gradients = True
    keeps_encoded_image = True  # the stored image size is checked against the mask's; ``stretch`` re-decodes it

    def setup(self) -> None:
        from robustfm.evals.class_logits import ClassLogits

        params = self.params
        self.classes = ClassLogits(
            self.model, params["class_names"], params["templates"], params["index_of"],
            head_indexed=params["label_space"] == "present",
        )  # fmt: skip

    def output_fields(self) -> dict[str, FieldSpec]:
        return {
            "method": (object, ()),
            "target": (np.int64, ()),
            "correct": (np.int64, ()),
            "pixels": (np.int64, ()),
            "intersection": (np.int64, (2,)),
            "union": (np.int64, (2,)),
            "ap": (np.float64, ()),
            "constant": (np.int8, ()),
        }

    def score(self, batch: Mapping[str, np.ndarray], pixels: Any) -> list[dict[str, Any]]:
        import torch

        params = self.params
        size = self.model.image_size
        by_label = params["target"] == "label"
        rows: list[dict[str, Any]] = []
        keep, images, masks = [], [], []
        for row, sample in enumerate(str(i) for i in batch["id"]):
            if by_label and int(batch["label"][row]) not in self.classes.index_of:
                rows.append({"id": sample, "status": "unlabelled"})
                continue
            image, mask, problem = alignment_inputs(batch["image"][row], batch["mask"][row], size,
                                                    params["geometry"], sample)  # fmt: skip
            if problem:
                rows.append({"id": sample, "status": problem})
                continue
            keep.append(row)
            images.append(pixels[row] if image is None else torch.from_numpy(image).to(self.device))
            masks.append(mask)
        if not keep:
            return rows
        ids = [str(batch["id"][row]) for row in keep]
        chosen = torch.stack(images)
        targets = self._targets(chosen, [int(batch["label"][row]) for row in keep] if by_label else None)
        truth = np.stack(masks)
        for method in params["methods"]:
            rows.extend(self._method_rows(method, chosen, targets, truth, ids))
        return rows

    def _targets(self, pixels: Any, labels: list[int] | None) -> Any:
        import torch

        if labels is None:
            with torch.no_grad():
                return self.classes(pixels).argmax(dim=1)
        return torch.tensor([self.classes.index_of[y] for y in labels], dtype=torch.long, device=pixels.device)

    def _method_rows(self, method: str, pixels: Any, targets: Any, truth: np.ndarray, ids: list[str]) -> list[dict]:
        import torch

        from robustfm.evals.segmentation_metrics import one_hot_average_precision, segmentation_counts
        from robustfm.explain.relevance import relevance, to_pixels

        if method == RANDOM:
            grid = tuple(getattr(self.model, "grid_size", pixels.shape[-2:]))
            seeds = [sample_seed(i, 0, "relevance_alignment/random", self.seed) for i in ids]
            maps = torch.stack([torch.rand(grid, generator=torch.Generator().manual_seed(s)) for s in seeds])
        else:
            maps = relevance(method, self.model, pixels, self.classes.target_score(targets))
        upsampled, constant = to_pixels(maps.detach().float().cpu(), truth.shape[-2:])
        scores = upsampled.numpy()
        counts = segmentation_counts(scores, truth)
        ap = one_hot_average_precision(scores, truth)
        return [
            {
                "id": sample, "method": method, "target": int(targets[i]), "correct": counts.correct[i],
                "pixels": counts.pixels[i], "intersection": counts.intersection[i], "union": counts.union[i],
                "ap": ap[i], "constant": int(constant[i]),
            }
            for i, sample in enumerate(ids)
        ]  # fmt: skip


@SUITES.register("relevance_alignment", config=RelevanceAlignmentConfig)
class RelevanceAlignmentSuite(Suite):
    name = "relevance_alignment"
    version = "1"
    scorer = RelevanceAlignmentScorer
    columns = ("mask",)
    sort_keys = ("id", "method")
    needs_shards = True
    metric_specs = (
        MetricSpec(
            "pixel_accuracy",
            "higher",
            "share of all pixels of the set whose map-above-its-mean class (foreground / background) matches the mask",
        ),  # fmt: skip
        MetricSpec(
            "miou",
            "higher",
            "mean over background and foreground of the IoU of the map above its mean with "
            "the mask, intersections and unions summed over the set",
        ),  # fmt: skip
        MetricSpec("iou", "higher", "one class's IoU (intersections and unions summed over the set)"),
        MetricSpec("map", "higher", "mean over images of the AP of one-hot [bg, fg] targets vs [1 - map, map] scores"),
        MetricSpec("constant", "lower", "share of images whose map was constant (scored as all background)"),
    )

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        section = self.section
        if section.target == "label" or section.label_space == "present":
            self.columns = ("mask", "label", "class_name")  # labels only when they are used

    @classmethod
    def settings_problems(cls, section: RelevanceAlignmentConfig) -> list[str]:
        """Unknown method names (with a "did you mean") and an unreadable class map, before Ray starts."""
        from robustfm.evals.label_spaces import read_class_map
        from robustfm.registry import did_you_mean

        known = known_methods()
        problems = [
            f"{SECTION}.methods: unknown {m!r}{did_you_mean(m, list(known))}; known: {list(known)}"
            for m in section.methods
            if m not in known
        ]
        if section.class_map is not None:
            if not Path(section.class_map).is_file():
                problems.append(f"{SECTION}.class_map: {section.class_map!r} does not exist")
            else:
                try:
                    read_class_map(section.class_map)
                except ValueError as err:
                    problems.append(f"{SECTION}.class_map: {err}")
        return problems

    def scorer_params(self, dataset: Any) -> dict[str, Any]:
        from robustfm.evals.label_spaces import read_class_map, resolve_label_space

        section = self.section
        problems = self.settings_problems(section)
        if problems:
            raise ValueError("; ".join(problems))
        present = class_names_by_label(dataset) if "label" in self.columns else {}
        class_map = read_class_map(section.class_map) if section.class_map else None
        try:
            space = resolve_label_space(section.label_space, present, class_map=class_map)
        except ValueError as err:
            raise ValueError(f"{SECTION}: {err}") from err
        return {
            "class_names": space.class_names,
            "index_of": space.index_of,
            "label_space": section.label_space,
            "templates": list(section.templates),
            "methods": list(section.methods),
            "target": section.target,
            "geometry": section.geometry,
            # What the protocol must say about the reference protocol's choices (spec §1.3 "seg protocol").
            "threshold": "map > mean(map) per image, after bilinear upsampling and min-max (eps 1e-8)",
            "accumulation": "PA and per-class IoU: sums over the set; AP per image, then the mean",
        }

    def protocol_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The base record with the number of classes instead of their names."""
        record = {k: v for k, v in params.items() if k not in ("class_names", "index_of")}
        record["classes"] = len(params["class_names"])
        return super().protocol_params(record)

    @classmethod
    def summary_columns(cls, params: Mapping[str, Any]) -> dict[str, str]:
        methods = [m for m in params.get("methods", ()) if m != RANDOM]
        if not methods:
            return {}
        first = methods[0]
        return {f"PA ({first})": f"{first}/pixel_accuracy", f"mIoU ({first})": f"{first}/miou",
                f"mAP ({first})": f"{first}/map"}  # fmt: skip

    def aggregate(self, rows: Mapping[str, np.ndarray], params: Mapping[str, Any]) -> SuiteOutput:
        from robustfm.evals.segmentation_metrics import segmentation_summary

        methods = np.asarray(rows["method"]).astype(str)
        metrics, table = MetricTable(), []
        for method in params["methods"]:
            chosen = methods == method
            summary = segmentation_summary(
                np.asarray(rows["correct"])[chosen], np.asarray(rows["pixels"])[chosen],
                np.asarray(rows["intersection"])[chosen], np.asarray(rows["union"])[chosen],
                np.asarray(rows["ap"], dtype=np.float64)[chosen],
            )  # fmt: skip
            constant = float(np.asarray(rows["constant"])[chosen].mean()) if chosen.any() else float("nan")
            for score in SCORES:
                family = "iou" if score.startswith("iou_") else score
                metrics.add(f"{method}/{score}", summary[score], self.spec(family))
            metrics.add(f"{method}/constant", constant, self.spec("constant"))
            table.append({"method": method, "n_images": int(chosen.sum()), **summary, "constant": constant})
        return SuiteOutput(metrics, table)
