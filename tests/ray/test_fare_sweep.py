"""A FARE sweep through ``jobs/sweep.py``: lambda (``method.clean_weight``) and the learning rate, two trials on 2
CPUs, the held-out adversarial loss reported to Tune after every epoch and logged by the driver into one parent run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("recipe_fixtures", REPO / "tests" / "recipes" / "conftest.py")
recipe_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe_fixtures)
demo_shards = recipe_fixtures.demo_shards  # the session fixture, built once (needs ray_session)

pytestmark = [pytest.mark.ray]


def test_the_shipped_space_checks_against_the_fare_config():
    from robustfm.config import load_config
    from robustfm.recipes.fare import SWEEP
    from robustfm.sweeps.space import check_space_against, load_space

    space = load_space(REPO / "tune_spaces" / "fare_lr_clean_weight.yaml")
    assert space.recipe == "fare" and SWEEP.metrics[space.metric] == space.mode
    check_space_against(space, load_config(SWEEP.config_class, REPO / space.base_config, list(space.overrides)))
    assert set(space.space) == {"method.clean_weight", "train.stages.finetune.lr.image_encoder"}


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_fare_sweep_over_lambda_and_lr_through_the_job(tmp_path, demo_shards):
    from mlflow import MlflowClient

    out = tmp_path / "out"
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "recipe": "fare",
                "metric": "val/adversarial_loss",
                "mode": "min",
                "num_samples": 1,
                "max_concurrent": 2,
                "searcher": {"type": "grid", "seed": 0},
                "scheduler": {"type": "fifo"},
                "space": {
                    "method.clean_weight": "grid([0.0, 0.5])",
                    "train.stages.finetune.lr.image_encoder": "loguniform(1.0e-4, 1.0e-3)",
                },
            }
        )
    )
    overrides = {
        "output_dir": str(out),
        "data.shards": demo_shards,
        "tracking.uri": f"sqlite:///{out}/mlflow.db",
        "tracking.experiment": "fare-sweep",
        "train.stages.finetune.epochs": "2",
        "train.stages.finetune.max_batches_per_epoch": "2",
        "train.resources_per_worker.CPU": "0.2",
        "train.strategy.name": "ddp",
        "data.teacher.num_cpus": "0.2",
        "data.batch_size": "4",
        "data.holdout_fraction": "0.25",
        "method.attack.steps": "2",
        "eval.enabled": "false",
    }
    command = ["jobs/sweep.py", "--recipe", "fare", "--space", str(space), "--name", "fare"]
    done = recipe_fixtures.run_job([*command, *(f"{k}={v}" for k, v in overrides.items())], timeout=1100)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "best trial:" in done.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    experiment = client.get_experiment_by_name("fare-sweep")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(children) == 2
    assert {float(c.data.params["method.clean_weight"]) for c in children} == {0.0, 0.5}
    for child in children:
        assert child.info.status == "FINISHED"
        assert 0 <= child.data.metrics["val/clean_loss"] < child.data.metrics["val/adversarial_loss"]
        assert child.data.metrics["val/diverged"] == 0.0
