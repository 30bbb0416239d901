"""The recipe kit's stage loop: a recipe's curriculum trained with the engine, milestone by milestone.

Stages with no milestone evaluated between them train in one ``fit``: on a laptop or CI each Ray Train run costs ~20
CPU-seconds before its first step (controller, workers, data pipeline), on a cluster it reschedules workers and
reloads the model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from robustfm.recipes.kit import Evaluation, RecipeRun, TaskBuilder, milestone, milestone_name

logger = logging.getLogger("robustfm.recipes")


def train_curriculum(
    run: RecipeRun,
    builder: TaskBuilder,
    batches: Callable[[str], Any],
    evaluate: Callable[[str, Any], Evaluation],
) -> tuple[TaskBuilder, Any]:
    """Train every stage of ``run.cfg.curriculum`` in order, each from the weights the previous one left.

    Stages with no milestone evaluated between them train in one ``fit`` (one Ray Train run: workers, model and data
    set up once): a group ends at a stage whose milestone is evaluated, whose weights an earlier run saved (an
    ablation sharing the prefix), or at the last stage. The group's last stage saves its weights
    (``stages/<prefix>/task.safetensors``): a rerun skips it, and an interrupted group resumes from its latest
    checkpoint. A later run that asks for the milestone of a stage inside a group trains up to it again.

    Args:
        run: the running recipe.
        builder: builds the task from the pretrained backbone (stages chain their weights through it).
        batches: ``batches(stage)`` -> the engine's batch source for that stage.
        evaluate: ``evaluate(milestone, task)`` -> the evaluation function :func:`milestone` calls (lazily: inside a
            group, where no milestone is evaluated, ``task`` is None).

    Returns:
        The builder of the final weights and the final task.
    """
    curriculum = list(run.cfg.curriculum)
    current, task, first = builder.from_weights(None), None, 0
    for stages in stage_groups(run):
        names = [milestone_name(curriculum, index) for index in range(first, first + len(stages))]
        first += len(stages)
        saved = _saved_weights(run, names[-1])
        if saved.is_file():
            logger.info("stage %s already finished (%s): skipped", names[-1], saved)
        else:
            fit_stages(run, current, stages, names[-1], {stage: batches(stage) for stage in stages}, saved)
        for name in names[:-1]:
            milestone(run, name, evaluate(name, None))  # not evaluated (that would end the group); logged if cached
        current = builder.from_weights(saved)
        task = current()
        milestone(run, names[-1], evaluate(names[-1], task))
    return current, task


def stage_groups(run: RecipeRun) -> list[list[str]]:
    """The curriculum cut into the groups :func:`train_curriculum` trains in one fit each: a group ends at a stage
    whose milestone is evaluated, whose weights an earlier run saved, or at the last stage."""
    curriculum = list(run.cfg.curriculum)
    groups: list[list[str]] = [[]]
    for index, stage in enumerate(curriculum):
        groups[-1].append(stage)
        name = milestone_name(curriculum, index)
        if index < len(curriculum) - 1 and (run.cfg.evaluates(name) or _saved_weights(run, name).is_file()):
            groups.append([])
    return groups


def _saved_weights(run: RecipeRun, name: str) -> Path:
    return run.out / "stages" / name / "task.safetensors"


def fit_stages(
    run: RecipeRun, builder: TaskBuilder, stages: Sequence[str], name: str, batches: Mapping[str, Any], saved: Path
) -> Path:
    """Train ``stages`` in one engine run named after milestone ``name`` (resuming it if it has checkpoints) and save
    the task's final weights where the next group, and a rerun, find them."""
    from robustfm.models.weights import save_weights
    from robustfm.train import fit

    cfg = run.cfg
    train_cfg = dataclasses.replace(cfg.train, stages={s: cfg.train.stages[s] for s in stages}, seed=cfg.seed)
    result = fit(
        train_cfg,
        builder,
        dict(batches),
        tracking_uri=run.tracking_uri,
        experiment=cfg.tracking.experiment,
        parent_run_id=run.parent.run_id,
        run_name=f"{cfg.name}-{name}",
    )
    task = builder.from_weights(None)()
    task.load_state_dict(result.load_state_dict())
    save_weights(task, saved, metadata={"stages": name, "checkpoint": result.checkpoint_path})
    (saved.parent / "train_metrics.json").write_text(json.dumps(result.metrics, indent=2, default=str))
    return saved
