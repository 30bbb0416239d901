"""CFT, concept-guided fine-tuning (paper 001): a timm classifier's relevance maps are pulled onto the concepts of
its classes, measured before and after, exported with WiSE-FT.

    python jobs/cft.py --config configs/cft/demo.yaml                   # a laptop: embedded Ray, tiny model
    ray job submit --working-dir . -- python jobs/cft.py --config configs/cft/vit_b16.yaml ray.address=auto

Read :func:`run` top to bottom: set-up (the demo data set with masks when no shards are given; the seeded training
classes and their few images, saved with the run); the pretrained milestone; the training stages on those images
with their concept masks (one joint crop and flip for both); the fine-tuned milestone; the export with its WiSE-FT
mixes; the report: top-1 on fine-tuned and held-out classes, relevance alignment (PA, mIoU, mAP) per milestone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robustfm.recipes import kit
from robustfm.recipes.cft_config import MASK_COLUMN, CFTDataConfig, CFTRecipeConfig, check_inputs, read_class_list
from robustfm.recipes.curriculum import train_curriculum
from robustfm.seeding import epoch_seed
from robustfm.sweeps.recipes import REPO_ROOT, EpochValidation, RecipeSweep

TOP1 = "classification/top1"
HELD_OUT_TOP1 = "classification/held_out/top1"
TRAINED_TOP1 = "classification/train/top1"
MIOU = "relevance_alignment/{method}/miou"
TRAIN_CLASSES_FILE = "train_classes.txt"


def run(cfg: CFTRecipeConfig) -> kit.RecipeRun:
    """Run the whole recipe on the Ray that the caller started (``ray.init``); returns the kit's run record."""
    from robustfm.models.export import timm_state_dict

    # 1. set-up: data, the training classes and their images ----------------------------------------------------
    cfg = with_demo_data(cfg)
    run_ = kit.RecipeRun.start(cfg, "cft")
    chosen = select_training_images(cfg.data, cfg.seed)
    classes_file = run_.out / TRAIN_CLASSES_FILE
    classes_file.write_text("".join(f"{name}\n" for name in chosen.classes))
    run_.parent.log_artifact(classes_file)
    builder = kit.TaskBuilder("cft", cfg.model, cfg.method)
    settings = milestone_settings(cfg, classes_file)

    def measure(name: str, task: Any) -> Any:
        def evaluate(tracker: Any, run_id: str) -> kit.MilestoneResult:
            from robustfm.evals import evaluate_model

            return kit.MilestoneResult(evaluate_model(task.model, cfg.eval.suites, settings, tracker, run_id))

        return evaluate

    # 2. the starting model -----------------------------------------------------------------------------------------
    pretrained = builder.initial(cfg.seed)
    pretrained_state = timm_state_dict(pretrained.model)
    kit.milestone(run_, "pretrained", measure("pretrained", pretrained))

    # 3. fine-tuning: the curriculum's stages ------------------------------------------------------------------------
    _, task = train_curriculum(run_, builder, lambda stage: training_batches(cfg.data, cfg.seed, chosen), measure)

    # 4. export and WiSE-FT -----------------------------------------------------------------------------------------
    headline = headline_metric(cfg)
    export = kit.export_with_wise_ft(
        run_, task.model, pretrained_state, cfg.eval.suites, settings, headline, retention=TOP1
    )

    # 5. report -----------------------------------------------------------------------------------------------------
    table = milestone_table(run_.milestones, cfg)
    run_.log_table(table, "cft_table.md")
    run_.finish()
    kit.print_where(
        "CFT (paper 001)",
        run_,
        table,
        {
            "training classes": f"{classes_file} ({len(chosen.classes)} classes, {len(chosen.rows)} images)",
            "exported model (timm layout)": export.model_path,
            "WiSE-FT trade-off": export.tradeoff_plot or "not evaluated",
            "table": run_.out / "cft_table.md",
        },
    )
    return run_


def with_demo_data(cfg: CFTRecipeConfig) -> CFTRecipeConfig:
    """``cfg`` with ``data.shards`` set: the demo data set with its exact foreground masks (the concept masks of the
    demo: shapes and a horse silhouette) when the config names none. Built once; a rerun finds it."""
    if cfg.data.shards is not None:
        return cfg
    from robustfm.data.demo import write_demo_shards

    out = Path(cfg.output_dir).resolve() / cfg.name / "demo_data"
    shards = write_demo_shards(out, image_size=max(64, cfg.data.image_size), seed=cfg.seed, with_masks=True)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=str(shards)))


# --- the training images ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingImages:
    """The classes CFT fine-tunes on and the rows of their images (global indices of the training split)."""

    classes: list[str]
    rows: list[int]
    logit_of_label: dict[int, int]
    """Shard label -> the classifier's logit column (``data.label_space``)."""


def select_training_images(data: CFTDataConfig, seed: int) -> TrainingImages:
    """A seeded permutation of the split's sorted class names (or ``data.class_list``), cut to ``data.classes``; for
    each, ``data.images_per_class`` images drawn with the same seed. Read on the driver (two small columns)."""
    from robustfm.data.shards import Location, list_split
    from robustfm.evals.label_spaces import resolve_label_space

    listing = list_split(Location(data.shards, data.s3_endpoint_url), data.train_split)
    table = listing.read_rows(["label", "class_name"])
    by_class: dict[str, list[int]] = {}
    present: dict[int, str] = {}
    for index, (label, name) in enumerate(zip(table["label"], table["class_name"], strict=True)):
        by_class.setdefault(name, []).append(index)
        present[int(label)] = name
    rng = np.random.default_rng(epoch_seed(seed if data.class_seed is None else data.class_seed, 0, "cft/classes"))
    names = sorted(by_class)
    if data.class_list is not None:
        classes = read_class_list(data.class_list)
    else:
        classes = [names[i] for i in rng.permutation(len(names))][: data.classes or len(names)]
    rows: list[int] = []
    for name in classes:
        pool = by_class[name]
        take = min(data.images_per_class, len(pool))
        rows.extend(int(i) for i in rng.choice(pool, size=take, replace=False))
    space = resolve_label_space(data.label_space, dict(sorted(present.items())))
    return TrainingImages(classes, sorted(rows), dict(space.index_of))


def relabel_stage(logit_of_label: Mapping[int, int]) -> Any:
    """A Ray Data stage rewriting ``label`` as the classifier's logit column (ImageNet folders of a subset are
    labelled 0..k-1 by the converter; the model's head has ImageNet-1k's order)."""
    table = np.full(max(logit_of_label) + 1, -1, dtype=np.int64)
    for label, column in logit_of_label.items():
        table[label] = column

    def relabel(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch["label"] = table[np.asarray(batch["label"], dtype=np.int64)]
        return batch

    def stage(ds: Any, epoch: int) -> Any:
        return ds.map_batches(relabel, batch_format="numpy")

    return stage


def training_batches(data: CFTDataConfig, seed: int, chosen: TrainingImages) -> Any:
    """The chosen images with their labels and concept masks, one joint random-resized crop + flip per image."""
    return kit.training_source(
        data, seed, [relabel_stage(chosen.logit_of_label)], rows=chosen.rows, columns=("label", MASK_COLUMN)
    )


# --- milestones and report ----------------------------------------------------------------------------------------


def milestone_settings(cfg: CFTRecipeConfig, classes_file: Path) -> Any:
    """The suites' settings on the run's evaluation split, the classification split by the classes trained on."""
    from robustfm.config import replace_path
    from robustfm.recipes.milestones import with_eval_data

    settings = with_eval_data(cfg.eval.settings, cfg.data.shards, cfg.data.eval_split, None)
    for name in cfg.eval.suites:  # relevance alignment needs masked shards: the run's own have them
        if settings.suites[name].data.shards is None:
            settings = replace_path(settings, f"suites.{name}.data.shards", cfg.data.shards)
            settings = replace_path(settings, f"suites.{name}.data.split", cfg.data.eval_split)
    if "classification" in cfg.eval.suites and settings.suites["classification"].label_space == "imagenet1k":
        settings = replace_path(settings, "suites.classification.train_classes", str(classes_file))
    return settings


def headline_metric(cfg: CFTRecipeConfig) -> str:
    """mIoU of the first relevance method the alignment suite measures (top-1 without that suite)."""
    if "relevance_alignment" not in cfg.eval.suites:
        return TOP1
    return MIOU.format(method=cfg.eval.settings.suites["relevance_alignment"].methods[0])


def milestone_table(milestones: Mapping[str, Mapping[str, float]], cfg: CFTRecipeConfig) -> str:
    """Top-1 (all, fine-tuned classes, held-out classes) and relevance alignment per milestone."""
    from robustfm.recipes.milestones import markdown_table

    methods = []
    if "relevance_alignment" in cfg.eval.suites:
        methods = list(cfg.eval.settings.suites["relevance_alignment"].methods)
    rows = []
    for name, m in milestones.items():
        row: dict[str, Any] = {"milestone": name}
        row.update({"top-1": m.get(TOP1, float("nan")), "top-1 trained classes": m.get(TRAINED_TOP1, float("nan"))})
        row["top-1 held-out classes"] = m.get(HELD_OUT_TOP1, float("nan"))
        for method in methods:
            for metric, label in (("pixel_accuracy", "PA"), ("miou", "mIoU"), ("map", "mAP")):
                row[f"{method} {label}"] = m.get(f"relevance_alignment/{method}/{metric}", float("nan"))
        rows.append(row)
    return markdown_table(rows)


# --- sweeps ---------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class CFTValidation(EpochValidation):
    """After every epoch, on held-out images of the chosen classes: ``val/top1`` (what must be kept) and
    ``val/relevance_in_mask`` (the share of the relevance map inside the concept mask: what CFT raises), with the
    method's own relevance on its own target."""

    def measure(self, task: Any) -> dict[str, float]:
        import torch

        from robustfm.explain.relevance import relevance, to_pixels

        images, labels, masks = self.held_out("image", "label", MASK_COLUMN)
        labels = labels.long()
        logits = task.model(images)
        config = task.config
        target = labels if config.relevance_target == "label" else logits.argmax(1)
        maps = relevance(config.relevance, task.model, images, target, create_graph=False)
        phi, _ = to_pixels(maps, images.shape[-1])
        inside = (phi * (masks[:, 0] > 0)).flatten(1).sum(1) / phi.flatten(1).sum(1).clamp_min(1e-12)
        return {
            "val/top1": float((logits.argmax(1) == labels).float().mean()),
            "val/relevance_in_mask": float(torch.nan_to_num(inside, nan=0.0).mean()),
        }


def _validation(cfg: CFTRecipeConfig, builder: kit.TaskBuilder) -> CFTValidation:
    chosen = select_training_images(cfg.data, cfg.seed)
    stages = [relabel_stage(chosen.logit_of_label)]
    source = kit.heldout_source(cfg.data, cfg.seed, stages, rows=chosen.rows, columns=("label", MASK_COLUMN))
    return CFTValidation(builder, SWEEP.diverged_values, source=source)


SWEEP = RecipeSweep(
    config_class=CFTRecipeConfig,
    default_config=REPO_ROOT / "configs" / "cft" / "demo.yaml",
    metrics={"val/relevance_in_mask": "max", "val/top1": "max", "train/loss": "min"},
    diverged_values={"val/relevance_in_mask": 0.0, "val/top1": 0.0},
    builder=lambda cfg, weights: kit.TaskBuilder("cft", cfg.model, cfg.method, weights),
    batches=lambda cfg, stages: training_batches(cfg.data, cfg.seed, select_training_images(cfg.data, cfg.seed)),
    validation=_validation,
    problems=check_inputs,
    resolve_data=with_demo_data,
)
"""CFT as a sweepable recipe (the lambdas under ``method.*`` and the learning rates)."""
