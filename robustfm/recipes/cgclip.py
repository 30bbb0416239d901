"""CG-CLIP (paper 000): Adapt -> Isolate -> Tune, measured at every milestone, exported without its decoder.

    python jobs/cgclip.py --config configs/cgclip/demo.yaml            # a laptop: embedded Ray, tiny model
    ray job submit --working-dir . -- python jobs/cgclip.py --config configs/cgclip/vit_b32.yaml ray.address=auto

Read top to bottom:

1. set-up: output folder, tracker and the parent run, the training data (the demo set when none is given);
2. milestone "pretrained": detection and zero-shot suites, t-SNE of clean vs corrupted embeddings;
3. one ``fit`` per stage of the curriculum, each starting from the previous stage's weights, with its own trainable
   groups, learning rates and loss weights (``train.stages``); each is followed by its milestone;
4. export: the image and text towers without the decoder, plus WiSE-FT mixes of the image tower, each evaluated,
   with detection AUROC plotted against zero-shot retention;
5. a summary of where everything is.

A stage whose weights are already saved is skipped on a rerun, and an interrupted stage resumes from its latest
checkpoint (the engine's ``fit`` with the same run name): rerunning the same command finishes an interrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustfm.config import ModelConfig, flatten, save_resolved_config
from robustfm.methods.cgclip_config import CGClipConfig
from robustfm.recipes.cgclip_config import CGClipRecipeConfig

logger = logging.getLogger("robustfm.recipes.cgclip")
DETECTION_AUROC = "corruption_detection/zero_shot/all/auroc"
ZERO_SHOT_TOP1 = "zero_shot/clean/top1"
OOD_SUITE = "corruption_detection"
"""The suite a milestone also runs on ``data.ood_shards`` (paper 000 evaluates detection in and out of domain)."""


@dataclass(frozen=True)
class CGClipTaskBuilder:
    """Builds the CG-CLIP task on every Ray Train worker (picklable), from the previous stage's weights if any."""

    model: ModelConfig
    method: CGClipConfig
    init_weights: str | None = None
    """A stage's saved task state (safetensors); None: the pretrained backbone and a fresh decoder."""

    def __call__(self) -> Any:
        from robustfm.methods.cgclip import build_cgclip_task
        from robustfm.models.weights import load_weights

        task = build_cgclip_task(self.model, self.method)
        if self.init_weights is not None:
            load_weights(task, self.init_weights)
        return task


@dataclass(frozen=True)
class CGClipResult:
    """Where a finished CG-CLIP run left its outputs."""

    output_dir: Path
    export_path: Path
    wise_ft_paths: dict[float, Path]
    milestones: dict[str, dict[str, float]]
    parent_run_id: str


def run(cfg: CGClipRecipeConfig) -> CGClipResult:
    """Run the whole recipe on the Ray that the caller started (``ray.init``)."""
    from robustfm.tracking import create_tracker, resolve_tracking_uri

    # 1. set-up --------------------------------------------------------------------------------------------------
    out = Path(cfg.output_dir).resolve() / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out)
    tracking_uri = resolve_tracking_uri(cfg.tracking)
    tracker = create_tracker(cfg.tracking, tracking_uri)
    parent = tracker.start_run(cfg.name, tags={"recipe": "cgclip", "curriculum": ",".join(cfg.curriculum)})
    parent.log_params(flatten(cfg))
    parent.log_artifact(out / "resolved_config.yaml")
    shards = cfg.data.shards or _demo_shards(cfg, out)
    eval_cfg = _milestone_eval_config(cfg, shards)
    milestones: dict[str, dict[str, float]] = {}

    # 2. the pretrained model -------------------------------------------------------------------------------------
    pretrained = _initial_task(cfg)
    pretrained_clip_state = _clip_state(pretrained)
    milestones["pretrained"] = _milestone("pretrained", pretrained, cfg, shards, eval_cfg, tracker, parent, out)

    # 3. the curriculum: one fit per stage, each from the weights the previous one saved --------------------------
    # A milestone is named by the stages behind it ("adapt-isolate"), so ablations that share a prefix of the
    # curriculum (FLYP-only, w/o Tune, CG-CLIP) share its training and evaluation within one output folder.
    weights: str | None = None
    task = pretrained
    for i, stage in enumerate(cfg.curriculum):
        milestone = "-".join(cfg.curriculum[: i + 1])
        saved = out / "stages" / milestone / "task.safetensors"
        if not saved.is_file():
            weights = str(_fit_stage(cfg, stage, milestone, weights, shards, tracking_uri, parent.run_id, saved))
        else:
            logger.info("stage %s already finished (%s): skipped", milestone, saved)
            weights = str(saved)
        task = CGClipTaskBuilder(cfg.model, cfg.method, weights)()
        milestones[milestone] = _milestone(milestone, task, cfg, shards, eval_cfg, tracker, parent, out)

    # 4. export without the decoder, and the WiSE-FT trade-off ----------------------------------------------------
    from robustfm.methods.export import export_image_tower, export_wise_ft

    export_dir = out / "export" / "-".join(cfg.curriculum)
    metadata = {"model_name": cfg.model.name, "recipe": "cgclip", "curriculum": ",".join(cfg.curriculum)}
    export_path = export_image_tower(task.model, export_dir / "model.safetensors", metadata=metadata)
    parent.log_artifact(export_path, "export")
    wise_ft = {}
    if cfg.export.wise_ft_alphas:
        wise_ft = export_wise_ft(task.model, pretrained_clip_state, export_dir / "wise_ft", cfg.export.wise_ft_alphas)
        _wise_ft_tradeoff(cfg, wise_ft, eval_cfg, milestones["pretrained"], tracker, parent, out)

    # 5. summary ------------------------------------------------------------------------------------------------------
    table = _milestone_table(milestones)
    (out / "detection_table.md").write_text(table)
    parent.log_text(table, "detection_table.md")
    (out / "milestones.json").write_text(json.dumps(milestones, indent=2))
    parent.end()
    tracker.close()
    _print_where(cfg, out, export_path, table, tracking_uri)
    return CGClipResult(out, export_path, wise_ft, milestones, parent.run_id)


def _fit_stage(
    cfg: CGClipRecipeConfig,
    stage: str,
    milestone: str,
    init_weights: str | None,
    shards: str,
    tracking_uri: str | None,
    parent_run_id: str,
    saved: Path,
) -> Path:
    """Train one stage with the engine and save the task's state where the next stage (and a rerun) finds it."""
    from robustfm.models.weights import save_weights
    from robustfm.train import fit

    stage_cfg = cfg.train.stages[stage]
    batches = training_batches(cfg, shards, [stage])
    train_cfg = dataclasses.replace(cfg.train, stages={stage: stage_cfg}, seed=cfg.seed)
    result = fit(
        train_cfg,
        CGClipTaskBuilder(cfg.model, cfg.method, init_weights),
        batches,
        tracking_uri=tracking_uri,
        experiment=cfg.tracking.experiment,
        parent_run_id=parent_run_id,
        run_name=f"{cfg.name}-{milestone}",
    )
    task = CGClipTaskBuilder(cfg.model, cfg.method)()
    task.load_state_dict(result.load_state_dict())
    save_weights(task, saved, metadata={"stages": milestone, "checkpoint": result.checkpoint_path})
    (saved.parent / "train_metrics.json").write_text(json.dumps(result.metrics, indent=2, default=str))
    return saved


def training_batches(cfg: CGClipRecipeConfig, shards: str, stages: list[str]) -> Any:
    """The training split minus its held-out part, each image with its corrupted copy (and GT map when needed)."""
    from robustfm.data import ShardBatchSource

    # Ground-truth maps cost a VGG-16 pass per image: compute them only when the corruption loss counts.
    needs_maps = any(cfg.train.stages[s].loss_weights.get("corruption", 0.0) > 0 for s in stages)
    return ShardBatchSource(
        shards,
        cfg.data.train_split,
        cfg.data.image_size,
        cfg.data.clean_per_batch,
        train=True,
        seed=cfg.seed,
        stages=_corruption_stages(cfg, cfg.seed, needs_maps),
        crop_scale=cfg.data.crop_scale,
        endpoint_url=cfg.data.s3_endpoint_url,
        holdout_fraction=cfg.data.holdout_fraction,
        holdout_role="exclude",
    )


def _corruption_stages(cfg: CGClipRecipeConfig, corruption_seed: int, with_maps: bool) -> list[Any]:
    """Ray Data stages giving each image one corrupted copy drawn from ``data.corruption`` (and its GT map)."""
    from robustfm.data.corruption_stages import corrupt_stage, gt_map_stage_from_config

    corruption = cfg.data.corruption
    stages = [corrupt_stage(corruption.corruption_set, corruption.severities, corruption_seed, corruption.batch_size)]
    if with_maps:
        stages.append(gt_map_stage_from_config(cfg.data.gt_map))
    return stages


def evaluation_batches(
    cfg: CGClipRecipeConfig,
    shards: str,
    split: str,
    batch_size: int,
    corruption_seed: int,
    *,
    heldout_only: bool = False,
    with_maps: bool = False,
) -> Any:
    """Images of ``split`` in a fixed order (eval transform, no shuffle), each with one corrupted copy drawn from the
    training corruption set with ``corruption_seed`` (and its GT map when ``with_maps``). ``heldout_only`` keeps just
    the held-out part of the split (``data.holdout_fraction``): the validation set of a sweep."""
    from robustfm.data import ShardBatchSource

    return ShardBatchSource(
        shards,
        split,
        cfg.data.image_size,
        batch_size,
        train=False,
        seed=cfg.seed,
        stages=_corruption_stages(cfg, corruption_seed, with_maps),
        endpoint_url=cfg.data.s3_endpoint_url,
        holdout_fraction=cfg.data.holdout_fraction if heldout_only else 0.0,
        holdout_role="only",
    )


def first_evaluation_batch(
    cfg: CGClipRecipeConfig,
    shards: str,
    split: str,
    corruption_seed: int,
    *,
    max_images: int | None = None,
    heldout_only: bool = False,
    with_maps: bool = False,
) -> dict[str, Any]:
    """:func:`evaluation_batches` as one batch of its first ``max_images`` images (default: all of them)."""

    def source(batch_size: int) -> Any:
        return evaluation_batches(
            cfg, shards, split, batch_size, corruption_seed, heldout_only=heldout_only, with_maps=with_maps
        )

    rows = source(1).num_rows
    size = rows if max_images is None else min(max_images, rows)
    return next(iter(source(size).batches(epoch=0, rank=0, world_size=1, skip_batches=0)))


def _milestone(
    name: str, task: Any, cfg: CGClipRecipeConfig, shards: str, eval_cfg: Any, tracker: Any, parent: Any, out: Path
) -> dict[str, float]:
    """Evaluate one milestone; cached in ``milestones/<name>.json`` so a rerun does not repeat it."""
    cached = out / "milestones" / f"{name}.json"
    tsne_png = out / "tsne" / f"{name}.png"
    if cached.is_file():
        metrics = json.loads(cached.read_text())
    else:
        metrics = {}
        if cfg.eval.enabled:
            from robustfm.evals import evaluate_model

            run = tracker.start_run(f"milestone-{name}", parent_run_id=parent.run_id, tags={"milestone": name})
            metrics = evaluate_model(task.model.clip, cfg.eval.suites, eval_cfg, tracker, run.run_id)
            if cfg.data.ood_shards is not None:
                ood = evaluate_model(
                    task.model.clip, [OOD_SUITE], _ood_eval_config(cfg, eval_cfg), tracker, run.run_id, stage="ood"
                )
                metrics.update({f"ood/{key}": value for key, value in ood.items()})
            run.log_metrics(metrics)
            if cfg.eval.tsne:
                run.log_artifact(_tsne(name, task, cfg, shards, tsne_png), "tsne")
            run.end()
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(metrics, indent=2))
    # The parent run gets every milestone, also one computed by an earlier run that shares this prefix.
    parent.log_metrics({f"{name}/{k}": v for k, v in metrics.items()})
    if tsne_png.is_file():
        parent.log_artifact(tsne_png, "tsne")
    return metrics


def _tsne(name: str, task: Any, cfg: CGClipRecipeConfig, shards: str, png: Path) -> Path:
    """t-SNE of the image embeddings of held-out images, clean and corrupted (paper 000, figure 3)."""
    from robustfm.recipes.milestones import embeddings_of, tsne_plot

    batch = first_evaluation_batch(cfg, shards, cfg.data.eval_split, cfg.seed + 1, max_images=cfg.eval.tsne_samples)
    clean = embeddings_of(task.model.clip, batch["image"])
    corrupted = embeddings_of(task.model.clip, batch["corrupted"])
    return tsne_plot(clean, corrupted, png, f"CG-CLIP image embeddings: {name}", cfg.seed)


def _wise_ft_tradeoff(
    cfg: CGClipRecipeConfig,
    paths: dict[float, Path],
    eval_cfg: Any,
    pretrained_metrics: dict[str, float],
    tracker: Any,
    parent: Any,
    out: Path,
) -> None:
    """Evaluate each WiSE-FT mix; plot detection AUROC against zero-shot retention (fine-tuning can erase skills)."""
    from robustfm.evals import evaluate_model
    from robustfm.recipes.milestones import markdown_table, tradeoff_plot

    if not cfg.eval.enabled:
        return
    base_top1 = pretrained_metrics.get(ZERO_SHOT_TOP1)
    rows = []
    for alpha, path in paths.items():
        run = tracker.start_run(f"wise-ft-{alpha:g}", parent_run_id=parent.run_id, tags={"wise_ft_alpha": alpha})
        metrics = evaluate_model(
            f"{cfg.model.name}@{path}", ["corruption_detection", "zero_shot"], eval_cfg, tracker, run.run_id
        )
        run.log_metrics(metrics)
        run.end()
        top1 = metrics.get(ZERO_SHOT_TOP1, float("nan"))
        retention = top1 / base_top1 if base_top1 else float("nan")
        rows.append(
            {
                "alpha": alpha,
                "detection_auroc": metrics.get(DETECTION_AUROC, float("nan")),
                "zero_shot_top1": top1,
                "zero_shot_retention": retention,
            }
        )
    png = tradeoff_plot(
        rows,
        "zero_shot_retention",
        "detection_auroc",
        out / "wise_ft_tradeoff.png",
        "WiSE-FT: corruption detection vs zero-shot retention",
    )
    parent.log_artifact(png, "wise_ft")
    parent.log_text(markdown_table(rows), "wise_ft/tradeoff.md")
    (out / "wise_ft_tradeoff.md").write_text(markdown_table(rows))


def _milestone_eval_config(cfg: CGClipRecipeConfig, shards: str) -> Any:
    from robustfm.recipes.milestones import with_eval_data

    return with_eval_data(cfg.eval.suite_config, shards, cfg.data.eval_split, None)


def _ood_eval_config(cfg: CGClipRecipeConfig, eval_cfg: Any) -> Any:
    """The milestone evaluation's settings with the detection suite pointed at ``data.ood_shards``."""
    detection = eval_cfg.corruption_detection
    data = dataclasses.replace(detection.data, shards=cfg.data.ood_shards, split=cfg.data.ood_split)
    return dataclasses.replace(eval_cfg, corruption_detection=dataclasses.replace(detection, data=data))


def _milestone_table(milestones: dict[str, dict[str, float]]) -> str:
    from robustfm.recipes.milestones import markdown_table

    keys = [
        "corruption_detection/zero_shot/set/seen/auroc",
        "corruption_detection/zero_shot/set/unseen/auroc",
        "corruption_detection/probe/set/seen/auroc",
        "corruption_detection/probe/set/unseen/auroc",
        DETECTION_AUROC,
        ZERO_SHOT_TOP1,
    ]
    if any(key.startswith("ood/") for m in milestones.values() for key in m):
        keys += [f"ood/{key}" for key in keys[:4]]
    rows = [
        {"milestone": name, **{k.replace("corruption_detection/", ""): m.get(k, float("nan")) for k in keys}}
        for name, m in milestones.items()
    ]
    return markdown_table(rows)


def _demo_shards(cfg: CGClipRecipeConfig, out: Path) -> str:
    """The demo data set: scikit-image photos + generated images, written as shards through the real prepare path."""
    from robustfm.testing.datasets import write_demo_shards

    return str(write_demo_shards(out / "demo_data", image_size=max(64, cfg.data.image_size), seed=cfg.seed))


def _initial_task(cfg: CGClipRecipeConfig) -> Any:
    """The model the first stage starts from. The engine seeds torch with the run seed before building its task, so
    seeding the same way here makes a random-init backbone (the tiny demo model) the one that training starts from
    (else the "pretrained" milestone and the WiSE-FT mixes would use another random draw)."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return CGClipTaskBuilder(cfg.model, cfg.method)()


def _clip_state(task: Any) -> dict[str, Any]:
    from robustfm.methods.export import clip_state_dict

    return clip_state_dict(task.model)


def _print_where(cfg: CGClipRecipeConfig, out: Path, export_path: Path, table: str, tracking_uri: str | None) -> None:
    print("\nCG-CLIP finished.")
    print(f"  detection table (also {out / 'detection_table.md'}):\n")
    print(table)
    print(f"  exported model (no decoder, open_clip layout): {export_path}")
    print(f"  t-SNE plots: {out / 'tsne'}   WiSE-FT trade-off: {out / 'wise_ft_tradeoff.png'}")
    if tracking_uri and tracking_uri.startswith("sqlite:"):
        print(f"  MLflow: mlflow ui --backend-store-uri {tracking_uri}   (experiment '{cfg.tracking.experiment}')")
    elif tracking_uri:
        print(f"  MLflow: {tracking_uri} (experiment '{cfg.tracking.experiment}')")
