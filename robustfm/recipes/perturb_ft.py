"""Robustness fine-tuning to everyday perturbations (paper 004), measured before and after, exported with WiSE-FT.

    python jobs/perturb_ft.py --config configs/perturb_ft/demo.yaml          # a laptop: embedded Ray, tiny model
    ray job submit --working-dir . -- \
        python jobs/perturb_ft.py --config configs/perturb_ft/vit_b32.yaml ray.address=auto

Read :func:`run` top to bottom: set-up; the pretrained milestone; the training stages (images get one everyday
edit per epoch from a Ray Data stage, the frozen starting encoder's embeddings of the clean images come from a
frozen-model actor pool; the task pulls the edited image's embedding towards them); the fine-tuned milestone; the
export with its WiSE-FT mixes; the report: embedding robustness (mean / worst cosine, DivergenceRadius) and zero-shot
retention per milestone, and, per perturbation, how well the embedding change predicts the zero-shot accuracy drop
(Spearman over the swept values; paper 004: "robustness values can predict performance impacts").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from robustfm.recipes import kit
from robustfm.recipes.curriculum import train_curriculum
from robustfm.recipes.perturb_ft_config import PerturbFTDataConfig, PerturbFTRecipeConfig, check_paths
from robustfm.sweeps.recipes import REPO_ROOT, EpochValidation, RecipeSweep

MEAN_COSINE = "embedding_robustness/mean/mean_cosine"
WORST_COSINE = "embedding_robustness/mean/worst_cosine"
RADIUS = "embedding_robustness/mean/divergence_radius"


def run(cfg: PerturbFTRecipeConfig) -> kit.RecipeRun:
    """Run the whole recipe on the Ray that the caller started (``ray.init``); returns the kit's run record."""
    from robustfm.models.export import clip_state_dict
    from robustfm.recipes.milestones import with_eval_data

    # 1. set-up --------------------------------------------------------------------------------------------------
    cfg = kit.with_demo_data(cfg)
    run_ = kit.RecipeRun.start(cfg, "perturb_ft")
    builder = kit.TaskBuilder("perturb_ft", cfg.model, cfg.method)
    settings = with_eval_data(cfg.eval.settings, cfg.data.shards, cfg.data.eval_split, None)

    def measure(name: str, task: Any) -> Any:
        def evaluate(tracker: Any, run_id: str) -> kit.MilestoneResult:
            from robustfm.evals import evaluate_model

            return kit.MilestoneResult(evaluate_model(task.model, cfg.eval.suites, settings, tracker, run_id))

        return evaluate

    # 2. the starting model (also the frozen teacher f0) -------------------------------------------------------------
    pretrained = builder.initial(cfg.seed)
    pretrained_state = clip_state_dict(pretrained.model)
    kit.milestone(run_, "pretrained", measure("pretrained", pretrained))

    # 3. fine-tuning: the curriculum's stages ------------------------------------------------------------------------
    _, task = train_curriculum(run_, builder, lambda stage: training_batches(cfg, cfg.seed), measure)

    # 4. export and WiSE-FT -----------------------------------------------------------------------------------------
    export = kit.export_with_wise_ft(run_, task.model, pretrained_state, cfg.eval.suites, settings, MEAN_COSINE)

    # 5. report -----------------------------------------------------------------------------------------------------
    table = milestone_table(run_.milestones)
    run_.log_table(table, "robustness_table.md")
    final = run_.milestones[list(run_.milestones)[-1]]
    correlations = correlation_table(final)
    run_.log_table(correlations, "metric_vs_accuracy_drop.md")
    run_.finish()
    kit.print_where(
        "Robustness fine-tuning (paper 004)",
        run_,
        table + "\nEmbedding change vs zero-shot accuracy drop (fine-tuned model):\n\n" + correlations,
        {
            "exported model (open_clip layout)": export.model_path,
            "WiSE-FT trade-off": export.tradeoff_plot or "not evaluated",
            "tables": f"{run_.out / 'robustness_table.md'}, {run_.out / 'metric_vs_accuracy_drop.md'}",
        },
    )
    return run_


# --- batches -------------------------------------------------------------------------------------------------------


def teacher_stage(cfg: PerturbFTRecipeConfig) -> Any:
    """The frozen-model stage giving ``target`` = f0(image): the *starting* encoder (``model``, built from the run
    seed like the task, so a random-init backbone is the same network), never updated."""
    from robustfm.data.frozen_stage import EmbeddingLoader, encode_image, frozen_model_stage

    loader = EmbeddingLoader(cfg.model.name, cfg.model.pretrained, init_seed=cfg.seed)
    return frozen_model_stage(loader, inputs=("image",), output="target", apply=encode_image, pool=cfg.data.teacher)


def perturbation_stage(data: PerturbFTDataConfig, seed: int) -> Any:
    """One everyday edit per image and epoch (``perturbed``), drawn from ``data.perturbations``' value grids."""
    from robustfm.data.corruption_stages import random_perturb_stage

    return random_perturb_stage(data.perturbations, data.values_per_perturbation, seed, data.perturb_batch_size)


def training_batches(cfg: PerturbFTRecipeConfig, seed: int) -> Any:
    """The training split minus its held-out part: each image, its edited copy and the teacher's target."""
    return kit.training_source(cfg.data, seed, [perturbation_stage(cfg.data, seed), teacher_stage(cfg)])


# --- report --------------------------------------------------------------------------------------------------------


def milestone_table(milestones: Mapping[str, Mapping[str, float]]) -> str:
    """Embedding robustness and zero-shot accuracy (and its retention against the pretrained model) per milestone."""
    from robustfm.recipes.milestones import markdown_table

    base = milestones.get("pretrained", {}).get(kit.ZERO_SHOT_TOP1)
    rows = []
    for name, m in milestones.items():
        top1 = m.get(kit.ZERO_SHOT_TOP1, float("nan"))
        rows.append(
            {
                "milestone": name,
                "mean cosine": m.get(MEAN_COSINE, float("nan")),
                "worst cosine": m.get(WORST_COSINE, float("nan")),
                "DivergenceRadius": m.get(RADIUS, float("nan")),
                "zero-shot top-1": top1,
                "zero-shot retention": top1 / base if base else float("nan"),
            }
        )
    return markdown_table(rows)


def drop_correlations(metrics: Mapping[str, float]) -> dict[str, float]:
    """Per perturbation, Spearman's rho between the mean cosine at each swept value and the zero-shot top-1 drop at
    that value (negative: the more the embedding moves, the more accuracy drops); plus, across perturbations, rho
    between DivergenceRadius and the mean drop. NaN where a series is constant or has fewer than 3 points."""
    from scipy.stats import spearmanr

    clean = metrics.get(kit.ZERO_SHOT_TOP1)
    if clean is None:
        return {}
    prefix, suffix = "embedding_robustness/", "/cosine"
    by_perturbation: dict[str, list[tuple[float, float]]] = {}
    for key, cosine in metrics.items():
        if key.startswith(prefix) and key.endswith(suffix) and ":" in key:
            condition = key[len(prefix) : -len(suffix)]
            top1 = metrics.get(f"zero_shot/{condition}/top1")
            if top1 is not None:
                by_perturbation.setdefault(condition.split(":")[0], []).append((cosine, clean - top1))

    def rho(pairs: list[tuple[float, float]]) -> float:
        xs, ys = zip(*pairs, strict=True)
        if len(pairs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
            return float("nan")
        return float(spearmanr(xs, ys).statistic)

    result = {name: rho(pairs) for name, pairs in sorted(by_perturbation.items())}
    across = [
        (metrics[f"{prefix}{name}/divergence_radius"], sum(d for _, d in pairs) / len(pairs))
        for name, pairs in by_perturbation.items()
        if f"{prefix}{name}/divergence_radius" in metrics
    ]
    result["across perturbations (radius vs mean drop)"] = rho(across) if across else float("nan")
    return result


def correlation_table(metrics: Mapping[str, float]) -> str:
    from robustfm.recipes.milestones import markdown_table

    rows = [{"perturbation": name, "spearman rho": value} for name, value in drop_correlations(metrics).items()]
    return markdown_table(rows)


# --- sweeps ---------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class PerturbFTValidation(EpochValidation):
    """After every epoch, on held-out training images (each with one edit drawn at epoch 0): ``val/perturbed_cosine``
    = mean cos(f(P(x)), f0(x)) (what the method improves) and ``val/clean_cosine`` = mean cos(f(x), f0(x)) (what it
    must keep), with ``f0`` built once per process from the starting weights."""

    teacher: Any = None
    _target: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_target": None}

    def measure(self, task: Any) -> dict[str, float]:
        import torch.nn.functional as F

        clean, edited = self.held_out("image", "perturbed")
        if self._target is None:  # f0(x), once per process
            self._target = F.normalize(self.teacher("cpu").encode_image(clean).float(), dim=-1)
        target, model = self._target, task.model
        return {
            "val/perturbed_cosine": float((model.encode_image(edited, normalize=True) * target).sum(1).mean()),
            "val/clean_cosine": float((model.encode_image(clean, normalize=True) * target).sum(1).mean()),
        }


def _validation(cfg: PerturbFTRecipeConfig, builder: kit.TaskBuilder) -> PerturbFTValidation:
    from robustfm.data.frozen_stage import EmbeddingLoader

    source = kit.heldout_source(cfg.data, cfg.seed, [perturbation_stage(cfg.data, cfg.seed)])
    teacher = EmbeddingLoader(cfg.model.name, cfg.model.pretrained, init_seed=cfg.seed)
    return PerturbFTValidation(builder, SWEEP.diverged_values, source=source, teacher=teacher)


SWEEP = RecipeSweep(
    config_class=PerturbFTRecipeConfig,
    default_config=REPO_ROOT / "configs" / "perturb_ft" / "demo.yaml",
    metrics={"val/perturbed_cosine": "max", "val/clean_cosine": "max", "train/loss": "min"},
    diverged_values={"val/perturbed_cosine": -1.0, "val/clean_cosine": -1.0},
    builder=lambda cfg, weights: kit.TaskBuilder("perturb_ft", cfg.model, cfg.method, weights),
    batches=lambda cfg, stages: training_batches(cfg, cfg.seed),
    validation=_validation,
    problems=check_paths,
    resolve_data=kit.with_demo_data,
)
"""Paper 004's fine-tuning as a sweepable recipe (lambda = the clean loss weight, and learning rates)."""
