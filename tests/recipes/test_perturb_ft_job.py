"""Paper 004's fine-tuning end to end through ``jobs/perturb_ft.py`` on the demo shards, on the recipe kit:
killed mid-stage, the same command resumes the stage from its checkpoint without re-evaluating the cached
pretrained milestone; run once more, the finished stage is skipped and nothing is trained again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.recipes.conftest import JOB_TIMEOUT_S, run_job

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def perturb_ft_overrides(out: Path, shards: str, **extra: str) -> list[str]:
    """The demo config cut to a couple of batches per epoch and tiny evaluation sets."""
    overrides = {
        "output_dir": str(out),
        "name": "pft",
        "data.shards": shards,
        "tracking.uri": f"sqlite:///{out}/mlflow.db",
        "train.storage_path": str(out / "runs"),
        "train.stages.finetune.epochs": "2",
        "train.stages.finetune.max_batches_per_epoch": "2",
        "train.checkpoint_every_steps": "1",
        "data.batch_size": "8",
        "data.perturbations": "[brightness,jpeg_quality,gaussian_blur]",
        "eval.settings.suites.embedding_robustness.data.max_samples": "8",
        "eval.settings.suites.embedding_robustness.perturbations": "[brightness,jpeg_quality,gaussian_blur]",
        "eval.settings.suites.zero_shot.data.max_samples": "8",
        "eval.settings.suites.zero_shot.perturbations": "[brightness,jpeg_quality,gaussian_blur]",
        "export.wise_ft_alphas": "[]",
        "ray.include_dashboard": "false",  # as in tiny_cgclip_overrides
    }
    overrides.update(extra)
    return [f"{key}={value}" for key, value in overrides.items()]


@pytest.mark.timeout(3 * JOB_TIMEOUT_S + 120)
def test_perturb_ft_runs_resumes_and_skips_finished_stages(demo_shards, tmp_path):
    base = [
        "jobs/perturb_ft.py",
        "--config",
        "configs/perturb_ft/demo.yaml",
        *perturb_ft_overrides(tmp_path, demo_shards),
    ]
    out = tmp_path / "pft"
    saved = out / "stages" / "finetune" / "task.safetensors"
    pretrained_cache = out / "milestones" / "pretrained.json"

    # Every worker dies right after global step 3, before its checkpoint: the newest in storage is step 2's.
    first = run_job([*base, "train.fail_at_step=3"])
    assert first.returncode != 0
    assert pretrained_cache.is_file(), first.stdout[-3000:] + first.stderr[-3000:]
    assert not saved.exists()
    pretrained_mtime = pretrained_cache.stat().st_mtime

    second = run_job(base)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert saved.is_file()
    assert pretrained_cache.stat().st_mtime == pretrained_mtime  # the cached milestone was not evaluated again
    train_state = json.loads((out / "stages" / "finetune" / "train_metrics.json").read_text())
    assert train_state["global_step"] == 4
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("perturb-ft-demo")
    stage_runs = [
        r
        for r in client.search_runs([experiment.experiment_id], max_results=500)
        if r.data.tags.get("stage") == "finetune"
    ]
    resumed = [int(r.data.tags.get("resumed_at_step", "0")) for r in stage_runs]
    assert max(resumed) == 2, f"the stage did not resume from its step-2 checkpoint: {resumed}"

    # The report: both milestones, the robustness table, the correlations, the export loading back in open_clip.
    from robustfm.perturbations import sweep

    milestones = json.loads((out / "milestones.json").read_text())
    assert set(milestones) == {"pretrained", "finetune"}
    for metrics in milestones.values():
        assert 0 < metrics["embedding_robustness/mean/mean_cosine"] <= 1
        for value in sweep("brightness", 3):  # both suites measured every value of the same grid
            assert f"zero_shot/brightness:{value:g}/top1" in metrics
            assert f"embedding_robustness/brightness:{value:g}/cosine" in metrics
    assert "zero-shot retention" in (out / "robustness_table.md").read_text()
    correlations = (out / "metric_vs_accuracy_drop.md").read_text()
    assert "brightness" in correlations and "across perturbations" in correlations
    assert "Robustness fine-tuning (paper 004) finished." in second.stdout

    import open_clip
    from safetensors.torch import load_file

    from robustfm.models import create_model

    create_model("open_clip/tiny-vit")  # registers the tiny config with open_clip
    open_clip.create_model("tiny-vit").load_state_dict(load_file(out / "export" / "finetune" / "model.safetensors"))

    # A third run finds the stage finished: skipped, nothing trained (the stage's weights are untouched).
    saved_mtime = saved.stat().st_mtime
    runs_before = sorted(p.name for p in (tmp_path / "runs").iterdir())
    third = run_job(base)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert saved.stat().st_mtime == saved_mtime
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == runs_before
    assert "stage finetune already finished" in (out / "logs" / "job.log").read_text()
