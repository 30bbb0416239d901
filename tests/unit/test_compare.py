"""jobs/compare.py on a real local MLflow store: the table holds what differs and the final metrics; plots exist."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("sweep-exp", artifact_location=str(root / "artifacts"))
    parent = client.create_run(exp, run_name="sweep")
    trials = {"trial-a": (1e-6, 0.5, 0.91), "trial-b": (1e-5, 1.5, 0.95), "trial-c": (1e-3, 1.5, 0.40)}
    for name, (lr, lam, auroc) in trials.items():
        run = client.create_run(exp, run_name=name, tags={"mlflow.parentRunId": parent.info.run_id})
        for key, value in {"stages.tune.lr": lr, "stages.tune.loss_weights.corruption": lam, "seed": 0}.items():
            client.log_param(run.info.run_id, key, value)
        for step in range(3):
            client.log_metric(run.info.run_id, "val/auroc", auroc * (step + 1) / 3, step=step)
            client.log_metric(run.info.run_id, "train/loss", 1.0 / (step + 1), step=step)
        client.set_terminated(run.info.run_id)
    client.set_terminated(parent.info.run_id)
    return uri, parent.info.run_id, trials


def test_compare_sweep_writes_table_and_plots(sweep_store, tmp_path, capsys):
    uri, parent_id, trials = sweep_store
    job = load_job("compare")
    code = job.main(
        [
            "--experiment",
            "sweep-exp",
            "--parent",
            parent_id,
            "--metric",
            "val/auroc",
            "train/loss",
            "--tracking-uri",
            uri,
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    markdown = (tmp_path / "comparison.md").read_text()
    assert "stages.tune.lr" in markdown and "stages.tune.loss_weights.corruption" in markdown
    assert "| seed" not in markdown  # the same in every trial: not a difference
    rows = {row["run"]: row for row in csv.DictReader((tmp_path / "comparison.csv").open())}
    assert set(rows) == set(trials)
    for name, (lr, _, auroc) in trials.items():
        assert float(rows[name]["val/auroc"]) == pytest.approx(auroc)  # the final (last step) value
        assert float(rows[name]["stages.tune.lr"]) == pytest.approx(lr)
    for png in [
        "curve_val_auroc.png",
        "curve_train_loss.png",
        "sweep_stages.tune.lr.png",
        "sweep_stages.tune.loss_weights.corruption.png",
    ]:
        with Image.open(tmp_path / png) as image:
            assert image.size[0] > 100
    assert "trial-b" in capsys.readouterr().out


def test_compare_named_runs_and_errors(sweep_store, tmp_path, capsys):
    uri, _, _ = sweep_store
    job = load_job("compare")
    assert (
        job.main(
            ["--experiment", "sweep-exp", "--runs", "trial-a", "trial-c", "--tracking-uri", uri, "--out", str(tmp_path)]
        )
        == 0
    )
    rows = list(csv.DictReader((tmp_path / "comparison.csv").open()))
    assert [r["run"] for r in rows] == ["trial-a", "trial-c"]
    assert job.main(["--experiment", "sweep-exp", "--runs", "trial-z", "--tracking-uri", uri]) == 2
    assert "runs not found in experiment 'sweep-exp': trial-z" in capsys.readouterr().err
    assert job.main(["--experiment", "nope", "--tracking-uri", uri]) == 2
    assert "no MLflow experiment named 'nope'" in capsys.readouterr().err
