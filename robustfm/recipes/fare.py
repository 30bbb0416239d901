"""FARE (paper 003): unsupervised adversarial fine-tuning of a CLIP image encoder, measured before and after.

    python jobs/fare.py --config configs/fare/demo.yaml             # a laptop: embedded Ray, tiny model
    ray job submit --working-dir . -- \
        python jobs/fare.py --config configs/fare/vit_l14_robustvlm.yaml ray.address=auto

Read :func:`run` top to bottom: set-up; the pretrained milestone; the training stages (the frozen starting
encoder's embeddings f0(x) of the clean images come from a frozen-model actor pool, each image gets its attack seed
from a data stage, and the task attacks the image encoder inside its forward, then pulls f(x + delta) towards f0(x));
the fine-tuned milestone; the export with its WiSE-FT mixes; the report: zero-shot accuracy clean and under APGD,
embedding robustness to everyday edits, and retention, per milestone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from robustfm.recipes import adversarial, kit
from robustfm.recipes.curriculum import train_curriculum
from robustfm.recipes.fare_config import FARERecipeConfig, check_paths
from robustfm.sweeps.recipes import REPO_ROOT, EpochValidation, RecipeSweep


def run(cfg: FARERecipeConfig) -> kit.RecipeRun:
    """Run the whole recipe on the Ray that the caller started (``ray.init``); returns the kit's run record."""
    from robustfm.models.export import clip_state_dict

    # 1. set-up --------------------------------------------------------------------------------------------------
    cfg = kit.with_demo_data(cfg)
    run_ = kit.RecipeRun.start(cfg, "fare")
    builder = kit.TaskBuilder("fare", cfg.model, cfg.method)
    settings = adversarial.eval_settings(cfg, run_)
    measure = adversarial.milestone_evaluation(cfg, settings)

    # 2. the starting model (also the frozen teacher f0) -------------------------------------------------------------
    pretrained = builder.initial(cfg.seed)
    pretrained_state = clip_state_dict(pretrained.model)
    kit.milestone(run_, "pretrained", measure("pretrained", pretrained))

    # 3. adversarial fine-tuning: the curriculum's stages ----------------------------------------------------------
    _, task = train_curriculum(run_, builder, lambda stage: training_batches(cfg), measure)

    # 4-5. export, WiSE-FT and the report ----------------------------------------------------------------------------
    adversarial.export_and_report(run_, "FARE (paper 003)", task.model, pretrained_state, settings)
    return run_


def teacher_stage(cfg: FARERecipeConfig) -> Any:
    """The frozen-model stage giving ``target`` = f0(image): the *starting* encoder (``model``, built from the run
    seed like the task, so a random-init backbone is the same network), never updated."""
    from robustfm.data.frozen_stage import EmbeddingLoader, encode_image, frozen_model_stage

    loader = EmbeddingLoader(cfg.model.name, cfg.model.pretrained, init_seed=cfg.seed)
    return frozen_model_stage(loader, inputs=("image",), output="target", apply=encode_image, pool=cfg.data.teacher)


def training_batches(cfg: FARERecipeConfig) -> Any:
    """Each training image with its attack seed and the teacher's target f0(image)."""
    return adversarial.training_batches(cfg, [teacher_stage(cfg)])


# --- sweeps ---------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class FAREValidation(EpochValidation):
    """After every epoch, on held-out training images: ``val/adversarial_loss`` = FARE's adversarial term under the
    method's own attack (fixed starts, the same every epoch) and ``val/clean_loss`` = its clean term, against f0
    built once per process from the starting weights."""

    teacher: Any = None
    _target: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_target": None}

    def measure(self, task: Any) -> dict[str, float]:
        import torch

        (clean,) = self.held_out("image")
        if self._target is None:  # f0(x), once per process
            self._target = self.teacher("cpu").encode_image(clean).float()
        totals = {"adversarial": 0.0, "clean": 0.0}
        for start in range(0, len(clean), 64):
            rows = slice(start, start + 64)
            batch = {"image": clean[rows], "target": self._target[rows], "attack_seed": torch.arange(len(clean))[rows]}
            losses = task(batch)
            for key in totals:
                totals[key] += float(losses[key]) * len(clean[rows])
        return {f"val/{key}_loss": value / len(clean) for key, value in totals.items()}


def _validation(cfg: FARERecipeConfig, builder: kit.TaskBuilder) -> FAREValidation:
    from robustfm.data.frozen_stage import EmbeddingLoader

    source = kit.heldout_source(cfg.data, cfg.seed, [])
    teacher = EmbeddingLoader(cfg.model.name, cfg.model.pretrained, init_seed=cfg.seed)
    return FAREValidation(builder, SWEEP.diverged_values, source=source, teacher=teacher)


SWEEP = RecipeSweep(
    config_class=FARERecipeConfig,
    default_config=REPO_ROOT / "configs" / "fare" / "demo.yaml",
    metrics={"val/adversarial_loss": "min", "val/clean_loss": "min", "train/loss": "min"},
    diverged_values={"val/adversarial_loss": 1e30, "val/clean_loss": 1e30},
    builder=lambda cfg, weights: kit.TaskBuilder("fare", cfg.model, cfg.method, weights),
    batches=lambda cfg, stages: training_batches(cfg),
    validation=_validation,
    problems=check_paths,
    resolve_data=kit.with_demo_data,
)
"""FARE as a sweepable recipe (lambda = ``method.clean_weight``, and learning rates)."""
