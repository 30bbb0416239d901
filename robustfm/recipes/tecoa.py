"""TeCoA (paper 003's supervised baseline): adversarial fine-tuning of a CLIP image encoder on zero-shot labels.

    python jobs/tecoa.py --config configs/tecoa/demo.yaml            # a laptop: embedded Ray, tiny model
    ray job submit --working-dir . -- \
        python jobs/tecoa.py --config configs/tecoa/vit_l14_robustvlm.yaml ray.address=auto

Read :func:`run` top to bottom: set-up (the class names: the shards' manifest or a names file, checked for
duplicates); the pretrained milestone; the training stages (each image gets its attack seed from a data stage; the
task attacks the zero-shot classifier of the frozen text tower's prompts inside its forward, then trains the image
encoder on the CE at the adversarial points); the fine-tuned milestone; the export with its WiSE-FT mixes; the report.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from robustfm.recipes import adversarial, kit
from robustfm.recipes.curriculum import train_curriculum
from robustfm.recipes.tecoa_config import TeCoARecipeConfig, check_paths, class_names_of
from robustfm.sweeps.recipes import REPO_ROOT, EpochValidation, RecipeSweep


def run(cfg: TeCoARecipeConfig) -> kit.RecipeRun:
    """Run the whole recipe on the Ray that the caller started (``ray.init``); returns the kit's run record."""
    from robustfm.models.export import clip_state_dict

    # 1. set-up --------------------------------------------------------------------------------------------------
    cfg = kit.with_demo_data(cfg)
    run_ = kit.RecipeRun.start(cfg, "tecoa")  # logs the config as given (names from the manifest stay out of it)
    method = with_class_names(cfg).method
    builder = kit.TaskBuilder("tecoa", cfg.model, method)
    settings = adversarial.eval_settings(cfg, run_)
    measure = adversarial.milestone_evaluation(cfg, settings)

    # 2. the starting model ------------------------------------------------------------------------------------------
    pretrained = builder.initial(cfg.seed)
    pretrained_state = clip_state_dict(pretrained.model)
    kit.milestone(run_, "pretrained", measure("pretrained", pretrained))

    # 3. adversarial fine-tuning: the curriculum's stages ----------------------------------------------------------
    _, task = train_curriculum(run_, builder, lambda stage: adversarial.training_batches(cfg), measure)

    # 4-5. export, WiSE-FT and the report ----------------------------------------------------------------------------
    adversarial.export_and_report(run_, "TeCoA (paper 003's baseline)", task.model, pretrained_state, settings)
    return run_


def with_class_names(cfg: TeCoARecipeConfig) -> TeCoARecipeConfig:
    """``cfg`` with ``method.class_names`` resolved from the shards' manifest (local or S3) or the names file."""
    from robustfm.data.shards import Location, load_manifest

    manifest = load_manifest(Location(cfg.data.shards, cfg.data.s3_endpoint_url))
    names = class_names_of(cfg, manifest)
    return dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, class_names=names))


# --- sweeps ---------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class TeCoAValidation(EpochValidation):
    """After every epoch, on held-out training images: ``val/adversarial_loss`` (TeCoA's CE under the method's own
    attack, fixed starts) and ``val/adversarial_top1`` / ``val/clean_top1`` (zero-shot accuracy with its prompts)."""

    def measure(self, task: Any) -> dict[str, float]:
        import torch

        images, labels = self.held_out("image", "label")
        labels = labels.long()
        totals = {"adversarial": 0.0, "adversarial_top1": 0.0, "clean_top1": 0.0}
        for start in range(0, len(images), 64):
            rows = slice(start, start + 64)
            x, y = images[rows], labels[rows]
            seeds = torch.arange(len(images))[rows]
            points = task.adversarial_points(task.logits, x, {"labels": y.clamp(min=0)}, {"attack_seed": seeds})
            adversarial_logits, clean_logits = task.logits(points), task.logits(x)
            totals["adversarial"] += float(torch.nn.functional.cross_entropy(adversarial_logits, y, reduction="sum"))
            totals["adversarial_top1"] += float((adversarial_logits.argmax(1) == y).sum())
            totals["clean_top1"] += float((clean_logits.argmax(1) == y).sum())
        n = len(images)
        return {
            "val/adversarial_loss": totals["adversarial"] / n,
            "val/adversarial_top1": totals["adversarial_top1"] / n,
            "val/clean_top1": totals["clean_top1"] / n,
        }


def _validation(cfg: TeCoARecipeConfig, builder: kit.TaskBuilder) -> TeCoAValidation:
    return TeCoAValidation(builder, SWEEP.diverged_values, source=kit.heldout_source(cfg.data, cfg.seed, []))


def _resolve(cfg: TeCoARecipeConfig) -> TeCoARecipeConfig:
    return with_class_names(kit.with_demo_data(cfg))


SWEEP = RecipeSweep(
    config_class=TeCoARecipeConfig,
    default_config=REPO_ROOT / "configs" / "tecoa" / "demo.yaml",
    metrics={
        "val/adversarial_loss": "min",
        "val/adversarial_top1": "max",
        "val/clean_top1": "max",
        "train/loss": "min",
    },
    diverged_values={"val/adversarial_loss": 1e30, "val/adversarial_top1": 0.0, "val/clean_top1": 0.0},
    builder=lambda cfg, weights: kit.TaskBuilder("tecoa", cfg.model, cfg.method, weights),
    batches=lambda cfg, stages: adversarial.training_batches(cfg),
    validation=_validation,
    problems=check_paths,
    resolve_data=_resolve,
)
"""TeCoA as a sweepable recipe (lambda = ``method.clean_weight``, and learning rates)."""
