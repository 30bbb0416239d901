"""What the FARE and TeCoA recipes share: the attack-seed data stage, the training batches, the milestone evaluation
and the report table.

Attack random starts are seeded per image from (run seed, id, epoch) by a data stage that adds the ``attack_seed``
column, so an image gets the same attack in any batch, on any rank and again after a resume (the task itself never
touches the global RNG for its attacks).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robustfm.methods.adversarial import ATTACK_SEED
from robustfm.recipes import kit
from robustfm.seeding import sample_seed

EMBEDDING_COSINE = "embedding_robustness/mean/mean_cosine"
logger = logging.getLogger("robustfm")


@dataclass(frozen=True)
class AttackSeedBatch:
    """Ray Data UDF: adds ``attack_seed`` (int64) = a hash of (run seed, id, epoch) to every row."""

    run_seed: int
    epoch: int

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from robustfm.data.frozen_stage import keep_columns

        out = keep_columns(batch)
        seeds = [sample_seed(str(i), self.epoch, "adversarial_start", self.run_seed) for i in batch["id"]]
        out[ATTACK_SEED] = np.asarray(seeds, dtype=np.int64)
        return out


@dataclass(frozen=True)
class AttackSeeds:
    """The data stage ``(dataset, epoch) -> dataset`` that adds ``attack_seed`` (picklable: plain data)."""

    run_seed: int

    def __call__(self, ds: Any, epoch: int) -> Any:
        return ds.map_batches(AttackSeedBatch(self.run_seed, epoch), batch_format="numpy", zero_copy_batch=True)


def training_batches(cfg: Any, stages: Sequence[Any] = ()) -> Any:
    """The training split minus its held-out part: each image (no augmentation unless ``data.augment``, shuffled
    every epoch), its ``attack_seed`` and what ``stages`` add (FARE: the teacher's ``target``)."""
    return kit.training_source(cfg.data, cfg.seed, [AttackSeeds(cfg.seed), *stages], augment=cfg.data.augment)


def eval_settings(cfg: Any, run: kit.RecipeRun) -> Any:
    """The milestone suites' settings: every suite without its own data reads ``data.eval_split``; their tables,
    protocols and plots go under ``<output_dir>/<name>/eval`` (next to the run, not the working directory)."""
    import dataclasses

    from robustfm.recipes.milestones import with_eval_data

    settings = with_demo_two_afc(cfg, cfg.eval.settings)
    settings = with_eval_data(settings, cfg.data.shards, cfg.data.eval_split, None)
    return dataclasses.replace(settings, output_dir=str(run.out / "eval"))


def with_demo_two_afc(cfg: Any, settings: Any) -> Any:
    """``settings`` with the demo 2AFC triplets (NIGHTS layout, ``test`` split) as the ``two_afc`` suite's data when
    the milestones run it and ``eval.settings.suites.two_afc.data.shards`` is null (the training images have no
    triplets, so null cannot mean "the recipe's evaluation split" here). Built once under
    ``<output_dir>/<name>/demo_data/two_afc``; the suite's protocol records that path as its data."""
    if "two_afc" not in cfg.eval.suites or settings.suites["two_afc"].data.shards is not None:
        return settings
    logger.warning(
        "2AFC milestones score the demo triplets (near copies of demo pictures): eval.settings.suites.two_afc.data."
        "shards is null; point it at NIGHTS or BAPPS shards from jobs/prepare_data.py to measure perceptual similarity"
    )
    from robustfm.config import replace_paths
    from robustfm.data.demo_two_afc import write_demo_two_afc

    out = Path(cfg.output_dir).resolve() / cfg.name / "demo_data" / "two_afc"
    shards = write_demo_two_afc(out, image_size=max(64, cfg.data.image_size), seed=cfg.seed)
    return replace_paths(settings, {"suites.two_afc.data.shards": str(shards), "suites.two_afc.data.split": "test"})


def milestone_evaluation(cfg: Any, settings: Any) -> Callable[[str, Any], kit.Evaluation]:
    """``measure(milestone, task)``: the milestone suites (zero-shot clean and under attack, embedding robustness)
    on the task's CLIP, copied to the suites' actor pools."""

    def measure(name: str, task: Any) -> kit.Evaluation:
        def evaluate(tracker: Any, run_id: str) -> kit.MilestoneResult:
            from robustfm.evals import evaluate_model

            return kit.MilestoneResult(evaluate_model(task.model, cfg.eval.suites, settings, tracker, run_id))

        return evaluate

    return measure


def attack_columns(cfg: Any) -> dict[str, str]:
    """Report column -> milestone metric of every attack condition (``apgd_ce linf 0.0157`` ...)."""
    from robustfm.evals.zero_shot_attacks import ALL_ATTACKS, condition

    zero_shot = cfg.eval.settings.suites["zero_shot"]
    columns = {}
    for eps in zero_shot.attack_eps:
        for attack in [*zero_shot.attacks, ALL_ATTACKS]:
            if attack == ALL_ATTACKS and len(zero_shot.attacks) == 1:
                continue  # the same number as the single attack's
            label = f"robust top-1 {attack} {zero_shot.attack_norm} {_eps_text(eps, zero_shot.attack_norm)}"
            columns[label] = f"zero_shot/{condition(attack, zero_shot.attack_norm, eps)}/robust_top1"
    return columns


def two_afc_columns(cfg: Any) -> dict[str, str]:
    """Report column -> milestone metric of the 2AFC accuracy (all triplets pooled), clean and per threat."""
    if "two_afc" not in cfg.eval.suites:
        return {}
    from robustfm.evals.suites.two_afc import threat_condition

    columns = {"2AFC accuracy": "two_afc/clean/all/accuracy"}
    for threat in cfg.eval.settings.suites["two_afc"].threats:
        label = f"2AFC robust {threat.norm} {_eps_text(threat.eps, threat.norm)}"
        columns[label] = f"two_afc/{threat_condition(threat)}/all/robust_accuracy"
    return columns


def _eps_text(eps: float, norm: str) -> str:
    in_255ths = eps * 255
    return f"{in_255ths:g}/255" if norm == "linf" and abs(in_255ths - round(in_255ths)) < 1e-6 else f"{eps:g}"


def milestone_table(milestones: Mapping[str, Mapping[str, float]], cfg: Any) -> str:
    """Per milestone: zero-shot top-1 clean (and its retention), on the attacked subset, robust top-1 per attack
    condition, the embedding robustness to everyday edits (mean cosine) and 2AFC accuracy clean and attacked."""
    from robustfm.recipes.milestones import markdown_table

    base = milestones.get("pretrained", {}).get(kit.ZERO_SHOT_TOP1)
    rows = []
    for name, metrics in milestones.items():
        top1 = metrics.get(kit.ZERO_SHOT_TOP1, float("nan"))
        row: dict[str, Any] = {
            "milestone": name,
            "zero-shot top-1": top1,
            "retention": top1 / base if base else float("nan"),
            "top-1 on the attacked subset": metrics.get("zero_shot/attack_subset/top1", float("nan")),
        }
        row.update({label: metrics.get(key, float("nan")) for label, key in attack_columns(cfg).items()})
        row["edit mean cosine"] = metrics.get(EMBEDDING_COSINE, float("nan"))
        row.update({label: metrics.get(key, float("nan")) for label, key in two_afc_columns(cfg).items()})
        rows.append(row)
    return markdown_table(rows)


def export_and_report(
    run: kit.RecipeRun, title: str, model: Any, pretrained_state: Mapping[str, Any], settings: Any
) -> None:
    """Export the fine-tuned CLIP with its WiSE-FT mixes (robust top-1 against retention), write the milestone
    table, close the run and print where everything is."""
    cfg = run.cfg
    export = kit.export_with_wise_ft(run, model, pretrained_state, cfg.eval.suites, settings, cfg.headline())
    table = milestone_table(run.milestones, cfg)
    run.log_table(table, "robustness_table.md")
    run.finish()
    kit.print_where(
        title,
        run,
        table,
        {
            "exported model (open_clip layout)": export.model_path,
            "WiSE-FT trade-off": export.tradeoff_plot or "not evaluated",
            "table": run.out / "robustness_table.md",
            "milestone evaluations (tables, protocols, plots)": Path(settings.output_dir),
        },
    )
