"""``jobs/evaluate.py`` end to end: a side-by-side report card of two tiny models, logged to MLflow."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "jobs" / "evaluate.py"


def load_job():
    spec = importlib.util.spec_from_file_location("evaluate_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_entry_point_is_thin():
    assert len(JOB.read_text().splitlines()) < 60


def test_overrides_after_the_suite_list_are_overrides(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_job().main(["--model", "open_clip/tiny-vit", "--suite", "all", "eval.pool.max_actors=4", "--print-config"])
    assert exit_info.value.code == 0
    assert "max_actors: 4" in capsys.readouterr().out


def test_bad_model_and_suite_fail_before_ray_with_exit_2(tmp_path, capsys):
    job = load_job()
    assert job.main(["--suite", "retrieval", "--model", "tiny-vit", "tracking.backend=none"]) == 2
    assert "family/arch" in capsys.readouterr().err
    assert job.main(["--suite", "retreival", "--model", "open_clip/tiny-vit", "tracking.backend=none"]) == 2
    assert "did you mean 'retrieval'" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_report_card_compares_two_models(ray_session, tmp_path):
    import torch
    from mlflow.tracking import MlflowClient

    from robustfm.models import create_model
    from robustfm.models.weights import save_weights

    torch.manual_seed(1)
    weights = tmp_path / "finetuned" / "model.safetensors"
    save_weights(create_model("open_clip/tiny-vit"), weights, metadata={"model_name": "open_clip/tiny-vit"})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = [
        "--suite", "retrieval", "--model", "open_clip/tiny-vit", "--compare-with", str(weights),
        f"tracking.uri={uri}", "tracking.experiment=evals-job", f"eval.output_dir={tmp_path / 'out'}",
        "eval.suites.retrieval.data.synthetic_samples=8", "eval.suites.retrieval.ks=[1,5]",
        "eval.pool.min_actors=1", "eval.pool.max_actors=1", "eval.pool.batch_size=4",
    ]  # fmt: skip
    assert load_job().main(argv) == 0

    reports = list((tmp_path / "out" / "report").glob("*/report.md"))
    assert len(reports) == 1
    text = reports[0].read_text()
    assert "open_clip/tiny-vit" in text and "model.safetensors" in text
    assert "| metric | better | A | B | B - A | winner |" in text
    assert "| image_to_text/recall_at_1 | higher |" in text
    assert (reports[0].parent / "plots" / "retrieval__recall_at_k.png").is_file()

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("evals-job")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["model"] for r in children) == [
        "open_clip/tiny-vit",
        "open_clip/tiny-vit@model.safetensors",
    ]
    report_files = {a.path for a in client.list_artifacts(parents[0].info.run_id, "report")}
    assert "report/report.md" in report_files and "report/plots" in report_files
