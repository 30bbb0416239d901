"""CG-CLIP sweeps on 2 CPUs.

- A 3-trial grid with ASHA (two good learning rates, then a diverging one): the diverging trial is stopped early;
  MLflow holds one parent run with a child per trial; the best trial is reported; jobs/compare.py tabulates and
  plots the trials.
- ``jobs/sweep.py`` with Optuna TPE, interrupted (SIGINT, as Ctrl-C) while a trial runs, then run again with the same
  command: the sweep resumes, finished trials are kept, the interrupted one continues from its last checkpoint.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("recipe_fixtures", REPO / "tests" / "recipes" / "conftest.py")
recipe_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe_fixtures)
demo_shards = recipe_fixtures.demo_shards  # the session fixture, built once (needs ray_session)

SWEPT = "train.stages.tune.lr.image_encoder"
GOOD_LRS = [1.0e-3, 1.0e-2]
DIVERGING_LR = 50.0  # AdamW moves every weight by ~lr per step: the embeddings are NaN within an epoch
TARGET = "val/auroc"


def tiny_sweep_overrides(out: Path, shards: str) -> list[str]:
    """The tiny CG-CLIP config: Tune stage only, 2 epochs of 2 batches, contrastive loss only (no VGG map actor),
    no milestone evaluation, fractional CPUs."""
    return recipe_fixtures.tiny_cgclip_overrides(
        out,
        shards,
        **{
            "name": "sweep-test",
            "curriculum": "[tune]",
            "train.stages.tune.epochs": "2",
            "train.stages.tune.loss_weights.corruption": "0",
            "eval.enabled": "false",
            "eval.tsne": "false",
            "data.holdout_fraction": "0.25",  # 8 held-out images, each clean and corrupted
            # 2 trials x (0.05 trial + 0.2 worker + 0.2 GT-map actor) leaves one whole CPU for a Ray Data task
            "train.resources_per_worker.CPU": "0.2",
            "data.gt_map.num_cpus": "0.2",
            "tracking.experiment": "sweep-test",
        },
    )


def write_space(
    path: Path,
    searcher: str,
    scheduler: dict,
    values: list[float] | None = None,
    max_concurrent: int = 2,
    num_samples: int = 1,
    distribution: str | None = None,
) -> Path:
    space = {
        "recipe": "cgclip",
        "metric": TARGET,
        "mode": "max",
        "num_samples": num_samples,
        "max_concurrent": max_concurrent,
        "searcher": {"type": searcher, "seed": 0},
        "scheduler": scheduler,
        "stages": ["tune"],
        "space": {SWEPT: distribution or f"grid({values})"},
    }
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_asha_sweep_stops_diverging_trial_and_logs_children(tmp_path, demo_shards, capsys):
    from mlflow import MlflowClient

    from robustfm.sweeps.tune import plan_sweep, run_sweep

    out = tmp_path / "out"
    space = write_space(
        tmp_path / "space.yaml",
        "grid",
        {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        [*GOOD_LRS, DIVERGING_LR],  # the diverging trial comes last: the rung already holds good trials' values
    )
    plan = plan_sweep("cgclip", space, "asha", tiny_sweep_overrides(out, demo_shards))
    result = run_sweep(plan)
    printed = capsys.readouterr().out

    by_lr = {t[SWEPT]: t for t in result.trials}
    assert sorted(by_lr) == sorted([*GOOD_LRS, DIVERGING_LR])
    bad = by_lr[DIVERGING_LR]
    good_epochs = [by_lr[lr]["epochs"] for lr in GOOD_LRS]
    assert max(good_epochs) == plan.total_epochs == 2
    assert 1 <= bad["epochs"] < max(good_epochs), result.trials  # stopped by ASHA at a rung
    assert bad["status"] == "STOPPED"
    assert bad[TARGET] == 0.0  # diverged: the worst AUROC, finite, instead of NaN
    assert all(0.0 < by_lr[lr][TARGET] <= 1.0 for lr in GOOD_LRS)

    # The best trial: highest last validation AUROC, reported on stdout, in best_trial.json and on the parent run.
    best = max(result.trials, key=lambda t: t[TARGET])
    assert result.best_trial_id == best["trial_id"] and result.best_config[SWEPT] == best[SWEPT]
    assert f"best trial: {best['trial_id']}" in printed
    assert (plan.experiment_dir / "best_trial.json").is_file()

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    experiment = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_id for p in parents] == [result.parent_run_id]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_trial_id"] == result.best_trial_id
    assert parent.data.metrics[f"best/{TARGET}"] == pytest.approx(result.best_metric)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert len(children) == 3 and len(runs) == 4  # no trial logged runs of its own into the SQLite store
    assert parent.data.tags["best_run_id"] in {c.info.run_id for c in children}
    for child in children:
        lr = float(child.data.params[SWEPT])
        trial = by_lr[lr]
        assert child.data.params["trial_id"] == trial["trial_id"] == child.data.tags["trial_id"]
        assert child.info.status == "FINISHED"
        history = client.get_metric_history(child.info.run_id, TARGET)
        assert sorted(m.step for m in history) == list(range(1, trial["epochs"] + 1))  # one value per epoch
        assert history and all(math.isfinite(m.value) for m in history)
    bad_child = next(c for c in children if float(c.data.params[SWEPT]) == DIVERGING_LR)
    assert bad_child.data.metrics["val/diverged"] == 1.0 and bad_child.data.tags["stopped_early"] == "true"

    # jobs/compare.py on the sweep's children: the table lists every trial with its lr and target, plus plots.
    compare_out = tmp_path / "compare"
    done = recipe_fixtures.run_job(
        [
            "jobs/compare.py",
            "--experiment",
            "sweep-test",
            "--parent",
            result.parent_run_id,
            "--metric",
            TARGET,
            "--tracking-uri",
            f"sqlite:///{out}/mlflow.db",
            "--out",
            str(compare_out),
        ],
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with (compare_out / "comparison.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3
    assert {float(r[SWEPT]) for r in rows} == set(by_lr)
    for row in rows:
        assert float(row[TARGET]) == pytest.approx(by_lr[float(row[SWEPT])][TARGET])
    markdown = (compare_out / "comparison.md").read_text()
    assert (
        SWEPT in markdown and TARGET in markdown and sum(line.startswith("| ") for line in markdown.splitlines()) == 4
    )  # header + 3
    for png in (f"curve_{TARGET.replace('/', '_')}.png", f"sweep_{SWEPT}.png"):
        assert (compare_out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def _children(client, experiment_name: str) -> list:
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    return [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]


def _wait_for(condition, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(
                f"the sweep ended (exit {process.returncode}) before the interruption:\n{log.read_text()[-4000:]}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for the sweep:\n{log.read_text()[-4000:]}")
        time.sleep(0.25)  # a trial's epoch can reach the driver within a second of the one before


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_interrupted_optuna_sweep_resumes_with_the_same_command(tmp_path, demo_shards):
    from mlflow import MlflowClient
    from safetensors.torch import save_file

    from robustfm.config import load_config
    from robustfm.recipes.cgclip_config import CGClipRecipeConfig
    from robustfm.recipes.kit import TaskBuilder

    out = tmp_path / "out"
    # A trial is 2 epochs of 4 steps (all 36 training images) and checkpoints at the end of its first. The
    # interruption has to land between the driver logging a trial's first epoch and its second: with 2 steps an
    # epoch that window was shorter than the 1 s polls here, and a fast machine finished the sweep first.
    overrides = [
        *tiny_sweep_overrides(out, demo_shards),
        "train.stages.tune.max_batches_per_epoch=4",
        "train.checkpoint_every_steps=4",
    ]
    cfg = load_config(CGClipRecipeConfig, REPO / "configs" / "cgclip" / "demo.yaml", overrides)
    init_weights = tmp_path / "adapt-isolate.safetensors"  # stands in for a recipe's saved early stages
    save_file(
        {k: v.contiguous() for k, v in TaskBuilder("cgclip", cfg.model, cfg.method)().state_dict().items()},
        init_weights,
    )
    space = write_space(
        tmp_path / "space.yaml",
        "optuna_tpe",
        {"type": "fifo"},
        max_concurrent=1,
        # the first finishes, the second is interrupted mid-trial and resumed; the third (still pending at the
        # interruption) keeps the sweep unfinished even if the second reaches its end while Tune stops
        num_samples=3,
        distribution="loguniform(1.0e-4, 1.0e-2)",
    )
    command = [
        sys.executable, "jobs/sweep.py", "--recipe", "cgclip", "--space", str(space), "--name", "resumable",
        "--init-weights", str(init_weights), *overrides,
    ]  # fmt: skip
    env = recipe_fixtures.job_environment()  # both runs join the session's Ray
    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")

    def epochs_logged(run) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run.info.run_id, TARGET))

    def second_trial_past_epoch_one() -> bool:
        children = _children(client, "sweep-test")
        finished = [c for c in children if c.info.status == "FINISHED"]
        running = [c for c in children if c.info.status == "RUNNING"]
        return len(finished) == 1 and len(running) == 1 and epochs_logged(running[0]) == [1]

    log = tmp_path / "first.log"
    with log.open("wb") as sink:
        first = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            _wait_for(second_trial_past_epoch_one, first, log, timeout=480)
            first.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves its state and returns
            assert first.wait(timeout=180) == 130, log.read_text()[-4000:]
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
    assert "interrupted" in log.read_text() and "Run the same command again" in log.read_text()
    before = {c.data.tags["trial_id"]: c for c in _children(client, "sweep-test")}
    assert sorted(c.info.status for c in before.values()) == ["FINISHED", "KILLED"]
    interrupted_id = next(t for t, c in before.items() if c.info.status == "KILLED")

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=480)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    experiment = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the same parent run, reopened
    children = {c.data.tags["trial_id"]: c for c in _children(client, "sweep-test")}
    assert len(children) == 3 and set(before) < set(children)  # 3 trials in all, the first two kept their runs
    for trial_id, child in before.items():
        assert children[trial_id].info.run_id == child.info.run_id
    for trial_id, child in children.items():
        assert child.info.status == "FINISHED"
        # Every epoch logged once: the interrupted trial resumed at epoch 2 from its checkpoint, not from scratch.
        assert epochs_logged(child) == [1, 2], trial_id
    lrs = {float(c.data.params[SWEPT]) for c in children.values()}
    assert len(lrs) == 3 and all(1.0e-4 <= lr <= 1.0e-2 for lr in lrs)  # three distinct TPE samples in range
    assert parents[0].data.tags["best_trial_id"] in children
    assert f"best trial: {parents[0].data.tags['best_trial_id']}" in second.stdout
    assert interrupted_id in children


def test_sweep_job_rejects_a_missing_init_weights_file_before_ray_starts(tmp_path, demo_shards):
    space = write_space(tmp_path / "space.yaml", "random", {"type": "fifo"}, distribution="loguniform(1e-4, 1e-2)")
    done = recipe_fixtures.run_job(
        [
            "jobs/sweep.py",
            "--recipe",
            "cgclip",
            "--space",
            str(space),
            "--init-weights",
            str(tmp_path / "missing.safetensors"),
            *tiny_sweep_overrides(tmp_path / "out", demo_shards),
        ],
        timeout=120,
        own_ray=True,
    )
    assert done.returncode == 2
    assert "init_weights" in done.stderr and "missing.safetensors" in done.stderr
    assert "Started a local Ray instance" not in done.stdout + done.stderr
    assert not (tmp_path / "out" / "sweeps").exists()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_perturb_ft_sweep_over_lambda_and_lr_through_the_job(tmp_path, demo_shards):
    """The second method sweeps through the same job: lambda (the clean term's weight) and the learning rate, two
    trials, the per-epoch held-out cosine reported to Tune and logged by the driver into one parent run."""
    from mlflow import MlflowClient

    out = tmp_path / "out"
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "recipe": "perturb_ft",
                "metric": "val/perturbed_cosine",
                "mode": "max",
                "num_samples": 1,
                "max_concurrent": 2,
                "searcher": {"type": "grid", "seed": 0},
                "scheduler": {"type": "fifo"},
                "space": {
                    "train.stages.finetune.loss_weights.clean": "grid([0.0, 1.0])",
                    "train.stages.finetune.lr.image_encoder": "loguniform(1.0e-4, 1.0e-3)",
                },
            }
        )
    )
    overrides = {
        "output_dir": str(out),
        "data.shards": demo_shards,
        "tracking.uri": f"sqlite:///{out}/mlflow.db",
        "tracking.experiment": "pft-sweep",
        "train.stages.finetune.epochs": "2",
        "train.stages.finetune.max_batches_per_epoch": "2",
        "train.resources_per_worker.CPU": "0.2",
        "data.teacher.num_cpus": "0.2",
        "data.batch_size": "8",
        "data.holdout_fraction": "0.25",
        "eval.enabled": "false",
    }
    command = ["jobs/sweep.py", "--recipe", "perturb_ft", "--space", str(space), "--name", "pft"]
    done = recipe_fixtures.run_job([*command, *(f"{k}={v}" for k, v in overrides.items())], timeout=840)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "best trial:" in done.stdout
    children = _children(MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db"), "pft-sweep")
    assert len(children) == 2
    assert {float(c.data.params["train.stages.finetune.loss_weights.clean"]) for c in children} == {0.0, 1.0}
    for child in children:
        assert child.info.status == "FINISHED"
        assert -1.0 <= child.data.metrics["val/perturbed_cosine"] <= 1.0
        assert child.data.metrics["val/diverged"] == 0.0
