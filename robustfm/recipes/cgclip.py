"""CG-CLIP (paper 000): Adapt -> Isolate -> Tune, measured at every milestone, exported without its decoder.

    python jobs/cgclip.py --config configs/cgclip/demo.yaml            # a laptop: embedded Ray, tiny model
    ray job submit --working-dir . -- python jobs/cgclip.py --config configs/cgclip/vit_b32.yaml ray.address=auto

Read :func:`run` top to bottom: set-up (the demo data set when no shards are given), the pretrained milestone, the
stages of the curriculum (each stage's trainable groups, learning rates and loss weights are in ``train.stages``;
stages with no milestone between them train in one ``fit``), each followed by its milestone (detection and
zero-shot suites, detection out of domain, a t-SNE of clean vs corrupted embeddings), then the export without the
decoder with its WiSE-FT mixes, and the summary.
Rerunning the same command finishes an interrupted run (the kit skips saved stages and cached milestones).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustfm.recipes.cgclip_config import CGClipDataConfig, CGClipRecipeConfig, check_paths
from robustfm.recipes.kit import (
    ZERO_SHOT_TOP1,
    MilestoneResult,
    RecipeRun,
    TaskBuilder,
    heldout_source,
    training_source,
    with_demo_data,
)
from robustfm.sweeps.recipes import REPO_ROOT, EpochValidation, RecipeSweep

logger = logging.getLogger("robustfm.recipes.cgclip")
DETECTION_AUROC = "corruption_detection/zero_shot/all/auroc"
OOD_SUITE = "corruption_detection"
"""The suite a milestone also runs on each of ``data.ood`` (paper 000 evaluates detection in and out of domain)."""


def run(cfg: CGClipRecipeConfig) -> Any:
    """Run the whole recipe on the Ray that the caller started (``ray.init``); returns the kit's run record."""
    from robustfm.models.export import clip_state_dict
    from robustfm.recipes.curriculum import train_curriculum
    from robustfm.recipes.kit import export_with_wise_ft, milestone, print_where

    # 1. set-up: inputs (the GT maps' scale fitted for the configured VGG), output folder, tracker and parent run -----
    cfg = with_fitted_gt_scale(with_demo_data(cfg))
    run_ = RecipeRun.start(cfg, "cgclip", tags={"curriculum": ",".join(cfg.curriculum)})
    builder = TaskBuilder("cgclip", cfg.model, cfg.method)
    settings = milestone_eval_settings(cfg)

    # 2. the pretrained model ---------------------------------------------------------------------------------------
    pretrained = builder.initial(cfg.seed)
    pretrained_state = clip_state_dict(pretrained.model.clip)
    milestone(run_, "pretrained", measure(cfg, settings, run_.out, "pretrained", pretrained))

    # 3. the curriculum; ground-truth maps only for stages whose corruption loss counts ------------------------------
    def batches(stage: str) -> Any:
        return training_batches(cfg.data, cfg.seed, cfg.clean_per_worker, with_maps=_needs_maps(cfg, [stage]))

    _, task = train_curriculum(run_, builder, batches, lambda name, task: measure(cfg, settings, run_.out, name, task))

    # 4. export without the decoder, and the WiSE-FT trade-off ------------------------------------------------------
    export = export_with_wise_ft(
        run_, task.model.clip, pretrained_state, ["corruption_detection", "zero_shot"], settings, DETECTION_AUROC
    )

    # 5. summary ----------------------------------------------------------------------------------------------------
    table = milestone_table(run_.milestones)
    run_.log_table(table, "detection_table.md")
    run_.finish()
    print_where(
        "CG-CLIP",
        run_,
        table,
        {
            "exported model (no decoder, open_clip layout)": export.model_path,
            "t-SNE plots": run_.out / "tsne",
            "WiSE-FT trade-off": export.tradeoff_plot or "not evaluated",
            "detection table": run_.out / "detection_table.md",
        },
    )
    return run_


def with_fitted_gt_scale(cfg: CGClipRecipeConfig) -> CGClipRecipeConfig:
    """``cfg`` with ``data.gt_map.scale`` set, and the maps checked: when no scale is given, it is fitted for the
    configured network on the run's first training images (``fit_quantile`` of the raw values of their corrupted
    copies) and cached beside the shards, so every stage, rerun and evaluation uses the same one; a given scale is
    checked on the same images. Maps that saturate or vanish are warned about with the numbers. Nothing happens when
    no stage weighs the corruption loss (no maps are computed)."""
    import json

    from robustfm.data.shards import Location, read_json, write_json_atomic
    from robustfm.gtmaps import build_gt_mapper
    from robustfm.gtmaps.fit import check_scale, fit_map_scale

    gt = cfg.data.gt_map
    if not _needs_maps(cfg, list(cfg.curriculum)):
        return cfg
    key = json.dumps(
        [gt.name, gt.weights, gt.layers, cfg.data.image_size, cfg.data.corruption.corruption_set, gt.fit_quantile],
        default=list,
    )
    location = Location(cfg.data.shards, cfg.data.s3_endpoint_url)
    cache, fs = location.join("gt_map_scales.json"), location.filesystem()
    cached = read_json(fs, cache) if fs.get_file_info(cache).size else {}
    batch = first_evaluation_batch(cfg.data, cfg.data.train_split, cfg.seed, seed=cfg.seed, max_images=gt.fit_images)
    mapper = build_gt_mapper(gt.name, weights=gt.weights, layers=gt.layers, scale=1.0)
    clean, corrupted = batch["image"].float(), batch["corrupted"].float()
    scale = gt.scale
    if scale is None:
        scale = cached.get(key)
    if scale is None:
        scale = fit_map_scale(mapper, [(clean, corrupted)], gt.fit_quantile)
        try:  # beside the shards, for every later run on them; a read-only store just means no cache
            write_json_atomic(location, cache, {**cached, key: scale})
        except OSError as err:
            logger.warning("could not cache the fitted GT-map scale in %s: %s", location.display(), err)
        logger.info(
            "gt_map.scale fitted for %s (weights %s, layers %s): %.6g, the %.3g quantile of raw corrupted-pixel values "
            "of the first %d training images",
            gt.name,
            gt.weights,
            gt.layers,
            scale,
            gt.fit_quantile,
            len(clean),
        )
    found = check_scale(mapper, clean, corrupted, scale)
    if found.problem:
        logger.warning("ground-truth maps: %s", found.problem)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, gt_map=dataclasses.replace(gt, scale=scale)))


def _needs_maps(cfg: CGClipRecipeConfig, stages: list[str]) -> bool:
    # A VGG-16 pass per image: compute ground-truth maps only when some stage's corruption loss counts.
    return any(cfg.train.stages[s].loss_weights.get("corruption", 0.0) > 0 for s in stages)


# --- batches -----------------------------------------------------------------------------------------------------


def _corruption_stages(data: CGClipDataConfig, corruption_seed: int, with_maps: bool) -> list[Any]:
    """Ray Data stages giving each image one corrupted copy drawn from ``data.corruption`` (and its GT map)."""
    from robustfm.data.corruption_stages import corrupt_stage, gt_map_stage_from_config

    corruption = data.corruption
    stages = [corrupt_stage(corruption.corruption_set, corruption.severities, corruption_seed, corruption.batch_size)]
    if with_maps:
        stages.append(gt_map_stage_from_config(data.gt_map))
    return stages


def training_batches(data: CGClipDataConfig, seed: int, clean_per_worker: int, *, with_maps: bool) -> Any:
    """The training split minus its held-out part, each image with its corrupted copy (and GT map ``with_maps``)."""
    return training_source(data, seed, _corruption_stages(data, seed, with_maps), batch_size=clean_per_worker)


def evaluation_batches(
    data: CGClipDataConfig,
    split: str,
    batch_size: int,
    corruption_seed: int,
    *,
    seed: int = 0,
    with_maps: bool = False,
) -> Any:
    """Images of ``split`` in a fixed order (eval transform, no shuffle), each with one corrupted copy drawn from the
    training corruption set with ``corruption_seed`` (and its GT map ``with_maps``)."""
    from robustfm.data import ShardBatchSource

    return ShardBatchSource(
        data.shards,
        split,
        data.image_size,
        batch_size,
        train=False,
        seed=seed,
        stages=_corruption_stages(data, corruption_seed, with_maps),
        endpoint_url=data.s3_endpoint_url,
    )


def first_evaluation_batch(
    data: CGClipDataConfig,
    split: str,
    corruption_seed: int,
    *,
    seed: int = 0,
    max_images: int | None = None,
    with_maps: bool = False,
) -> dict[str, Any]:
    """:func:`evaluation_batches` as one batch of its first ``max_images`` images (default: all of them)."""

    def source(batch_size: int) -> Any:
        return evaluation_batches(data, split, batch_size, corruption_seed, seed=seed, with_maps=with_maps)

    rows = source(1).num_rows
    size = rows if max_images is None else min(max_images, rows)
    return next(iter(source(size).batches(epoch=0, rank=0, world_size=1, skip_batches=0)))


# --- milestones ----------------------------------------------------------------------------------------------------


def milestone_eval_settings(cfg: CGClipRecipeConfig) -> Any:
    """The suites' settings this recipe evaluates with: the in-domain evaluation split filled in where a suite names
    no data, and (``detection_prompts: method``) the zero-shot detector asking with the method's own prompts."""
    from robustfm.config import replace_path
    from robustfm.recipes.milestones import with_eval_data

    settings = with_eval_data(cfg.eval.settings, cfg.data.shards, cfg.data.eval_split, None)
    if cfg.detection_prompts == "method":
        for kind in ("clean_prompts", "corrupt_prompts"):
            settings = replace_path(settings, f"suites.{OOD_SUITE}.{kind}", list(getattr(cfg.method, kind)))
    return settings


def measure(cfg: CGClipRecipeConfig, settings: Any, out: Path, name: str, task: Any) -> Any:
    """The evaluation of one milestone (for :func:`robustfm.recipes.kit.milestone`): the milestone suites on the CLIP
    model in domain, detection on every out-of-domain set of ``data.ood`` (the linear probe fitted in domain and
    applied as it is, unless ``probe: refit``), and the t-SNE plot."""

    def evaluate(tracker: Any, run_id: str) -> MilestoneResult:
        from robustfm.evals import evaluate_model

        model = task.model.clip
        milestone_settings, probe_settings = settings, None
        if OOD_SUITE in cfg.eval.suites and cfg.probe == "transfer":
            probe_settings = _probe_settings(cfg, settings, out / "milestones" / name / "probe.npz")
            evaluate_model(model, [OOD_SUITE], probe_settings["fit"], tracker, run_id, stage="probe-fit")
            milestone_settings = probe_settings["load"]
        metrics = evaluate_model(model, cfg.eval.suites, milestone_settings, tracker, run_id)
        for ood_name, ood in cfg.data.ood.items():
            ood_settings = _ood_settings(probe_settings["load"] if probe_settings else settings, ood.shards, ood.split)
            found = evaluate_model(model, [OOD_SUITE], ood_settings, tracker, run_id, stage=f"ood-{ood_name}")
            if cfg.probe == "refit":
                found = {key.replace("/probe/", "/probe_refit/"): value for key, value in found.items()}
            metrics.update({f"ood/{ood_name}/{key}": value for key, value in found.items()})
        artifacts = ()
        if cfg.eval.tsne:
            artifacts = ((str(_tsne(cfg, name, model, out / "tsne" / f"{name}.png")), "tsne"),)
        return MilestoneResult(metrics, artifacts)

    return evaluate


def _probe_settings(cfg: CGClipRecipeConfig, settings: Any, path: Path) -> dict[str, Any]:
    """``fit``: the detection suite on the in-domain training split minus its held-out rows, fitting the probe and
    saving it to ``path``; ``load``: the milestone settings applying that probe unchanged."""
    from robustfm.config import replace_paths

    suite = f"suites.{OOD_SUITE}"
    fit = replace_paths(
        settings,
        {
            f"{suite}.data.split": cfg.data.train_split,
            f"{suite}.data.holdout_fraction": cfg.data.holdout_fraction,
            f"{suite}.probe": "fit",
            f"{suite}.probe_path": str(path),
        },
    )
    load = replace_paths(settings, {f"{suite}.probe": "load", f"{suite}.probe_path": str(path)})
    return {"fit": fit, "load": load}


def _ood_settings(settings: Any, shards: str, split: str) -> Any:
    """The milestone settings with the detection suite pointed at an out-of-domain set."""
    from robustfm.config import replace_paths

    return replace_paths(settings, {f"suites.{OOD_SUITE}.data.shards": shards, f"suites.{OOD_SUITE}.data.split": split})


def _tsne(cfg: CGClipRecipeConfig, name: str, model: Any, png: Path) -> Path:
    """t-SNE of the image embeddings of evaluation images, clean and corrupted (paper 000, figure 3)."""
    from robustfm.recipes.milestones import embeddings_of, tsne_plot

    batch = first_evaluation_batch(
        cfg.data, cfg.data.eval_split, cfg.seed + 1, seed=cfg.seed, max_images=cfg.eval.tsne_samples
    )
    clean, corrupted = embeddings_of(model, batch["image"]), embeddings_of(model, batch["corrupted"])
    return tsne_plot(clean, corrupted, png, f"CG-CLIP image embeddings: {name}", cfg.seed)


def milestone_table(milestones: dict[str, dict[str, float]]) -> str:
    """Detection AUROC (seen / unseen, zero-shot / probe), overall detection and zero-shot accuracy per milestone."""
    from robustfm.recipes.milestones import markdown_table

    keys = [
        "corruption_detection/zero_shot/set/seen/auroc",
        "corruption_detection/zero_shot/set/unseen/auroc",
        "corruption_detection/probe/set/seen/auroc",
        "corruption_detection/probe/set/unseen/auroc",
        DETECTION_AUROC,
        ZERO_SHOT_TOP1,
    ]
    ood_sets = sorted({key.split("/")[1] for m in milestones.values() for key in m if key.startswith("ood/")})
    keys += [f"ood/{name}/{key}" for name in ood_sets for key in keys[:4]]
    rows = [
        {"milestone": name, **{k.replace("corruption_detection/", ""): m.get(k, float("nan")) for k in keys}}
        for name, m in milestones.items()
    ]
    return markdown_table(rows)


# --- sweeps ---------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class CGClipValidation(EpochValidation):
    """Zero-shot clean-vs-corrupted detection of the current weights on the held-out validation split.

    ``val/auroc`` is the ``corruption_detection`` suite's zero-shot detector (the same
    :class:`~robustfm.evals.suites.corruption_detection.ZeroShotDetector`, with the method's own prompts) on every
    ``round(1 / data.holdout_fraction)``-th image of ``data.train_split`` (which training excludes), each scored clean
    and with one corruption drawn as in training (epoch 0, so every epoch and trial sees the same images). Choosing
    lambda on it does not leak the test split (paper 000, A.1: "a held-out validation split of the training data").
    """

    def measure(self, task: Any) -> dict[str, float]:
        import torch

        from robustfm.evals.metrics import detection_metrics
        from robustfm.evals.suites.corruption_detection import ZeroShotDetector

        clean, corrupted = self.held_out("image", "corrupted")
        clip, method = task.model.clip, self.builder.settings
        embeddings = clip.encode_image(torch.cat([clean, corrupted]), normalize=True).double().numpy()
        scores = ZeroShotDetector.of(clip, method.clean_prompts, method.corrupt_prompts).p_corrupt(embeddings)
        labels = [0] * len(clean) + [1] * len(corrupted)
        return {f"val/{k}": v for k, v in detection_metrics(labels, scores).items()}


def _validation(cfg: CGClipRecipeConfig, builder: TaskBuilder) -> CGClipValidation:
    stages = _corruption_stages(cfg.data, cfg.seed, with_maps=False)
    return CGClipValidation(builder, SWEEP.diverged_values, source=heldout_source(cfg.data, cfg.seed, stages))


SWEEP = RecipeSweep(
    config_class=CGClipRecipeConfig,
    default_config=REPO_ROOT / "configs" / "cgclip" / "demo.yaml",
    metrics={"val/auroc": "max", "val/accuracy": "max", "val/f1": "max", "train/loss": "min"},
    diverged_values={"val/auroc": 0.0, "val/accuracy": 0.0, "val/f1": 0.0},
    builder=lambda cfg, weights: TaskBuilder("cgclip", cfg.model, cfg.method, weights),
    batches=lambda cfg, stages: training_batches(
        cfg.data, cfg.seed, cfg.clean_per_worker, with_maps=_needs_maps(cfg, list(stages))
    ),
    validation=_validation,
    problems=check_paths,
    resolve_data=lambda cfg: with_fitted_gt_scale(with_demo_data(cfg)),
)
"""CG-CLIP as a sweepable recipe: a trial trains some stages of the curriculum, validated after every epoch."""
