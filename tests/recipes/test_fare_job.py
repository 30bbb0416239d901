"""FARE end to end through ``jobs/fare.py`` on the demo shards (DeepSpeed ZeRO-2, the demo's strategy): killed
mid-stage, the same command resumes the stage from its checkpoint; the report has both milestones with robust
zero-shot accuracy, the export loads strictly in open_clip, and the text tower and temperature did not move. And the
batches the task trains on: f0 of the frozen-model stage is ``encode_image`` of the very crop the task attacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.recipes.conftest import JOB_TIMEOUT_S, run_job

pytestmark = [pytest.mark.ray]


def fare_overrides(out: Path, shards: str, **extra: str) -> list[str]:
    """The demo config cut to a couple of batches, a 2-step attack and tiny evaluation sets."""
    overrides = {
        "output_dir": str(out),
        "name": "fare",
        "data.shards": shards,
        "tracking.uri": f"sqlite:///{out}/mlflow.db",
        "train.storage_path": str(out / "runs"),
        "train.stages.finetune.epochs": "2",
        "train.stages.finetune.max_batches_per_epoch": "2",
        "train.checkpoint_every_steps": "1",
        "data.batch_size": "4",
        "method.attack.steps": "2",
        "eval.settings.suites.zero_shot.data.max_samples": "6",
        "eval.settings.suites.zero_shot.attack_steps": "3",
        "eval.settings.suites.embedding_robustness.data.max_samples": "4",
        "eval.settings.suites.embedding_robustness.perturbations": "[brightness]",
        "eval.settings.suites.embedding_robustness.steps": "2",
        "eval.settings.suites.two_afc.attack_steps": "2",
        "eval.settings.suites.two_afc.attack_samples": "2",
        "export.wise_ft_alphas": "[]",
        "ray.include_dashboard": "false",  # as in tiny_cgclip_overrides
    }
    overrides.update(extra)
    return [f"{key}={value}" for key, value in overrides.items()]


@pytest.mark.slow
@pytest.mark.timeout(2 * JOB_TIMEOUT_S + 120)
def test_fare_runs_resumes_and_exports_a_model_open_clip_loads(demo_shards, tmp_path):
    base = ["jobs/fare.py", "--config", "configs/fare/demo.yaml", *fare_overrides(tmp_path, demo_shards)]
    out = tmp_path / "fare"
    saved = out / "stages" / "finetune" / "task.safetensors"

    # Every worker dies right after global step 3, before its checkpoint: the newest in storage is step 2's.
    first = run_job([*base, "train.fail_at_step=3"])
    assert first.returncode != 0 and not saved.exists(), first.stdout[-3000:] + first.stderr[-3000:]
    second = run_job(base)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    train_state = json.loads((out / "stages" / "finetune" / "train_metrics.json").read_text())
    assert train_state["global_step"] == 4 and train_state["strategy"] == "deepspeed"
    assert "train.log" not in second.stdout
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("fare-demo")
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    resumed = [int(r.data.tags.get("resumed_at_step", "0")) for r in runs if r.data.tags.get("stage") == "finetune"]
    assert max(resumed) == 2, f"the stage did not resume from its step-2 checkpoint: {resumed}"
    stage_run = next(r for r in runs if r.data.tags.get("stage") == "finetune" and r.data.metrics.get("loss/fare"))
    assert stage_run.data.metrics["loss/adversarial"] >= 0 and "loss/clean" in stage_run.data.metrics

    # The report, and where everything is.
    milestones = json.loads((out / "milestones.json").read_text())
    assert set(milestones) == {"pretrained", "finetune"}
    headline = f"zero_shot/attacks_linf:{8 / 255:g}/robust_top1"
    for metrics in milestones.values():
        assert 0 <= metrics[headline] <= metrics["zero_shot/attack_subset/top1"]
    assert "FARE (paper 003) finished." in second.stdout
    for where in ("exported model (open_clip layout)", "table", "milestone evaluations", "MLflow: mlflow ui"):
        assert where in second.stdout
    table = (out / "robustness_table.md").read_text()
    for column in ("robust top-1 apgd_ce linf 8/255", "2AFC robust linf 8/255", "2AFC robust l2 3"):
        assert column in table
    # 2AFC at every milestone, on the demo triplets (near copies are found), 2 triplets per subset attacked.
    for metrics in milestones.values():
        robust = metrics[f"two_afc/apgd_linf:{8 / 255:g}/all/robust_accuracy"]
        assert 0 <= robust <= 1 and metrics["two_afc/clean/all/accuracy"] >= 0.75
    two_afc = json.loads(next((out / "eval").rglob("two_afc/protocol.json")).read_text())
    assert "demo_data/two_afc/shards" in two_afc["data"]["source"] and two_afc["data"]["split"] == "test"
    assert two_afc["params"]["resolved"]["attack_subset"]["num_samples"] == 4
    protocol = json.loads(next((out / "eval").rglob("zero_shot/protocol.json")).read_text())
    assert protocol["suite"]["version"] == "3" and protocol["params"]["resolved"]["attack_subset"]["num_samples"] == 6

    # The export loads strictly in open_clip; only the image tower moved.
    import open_clip
    import torch
    from safetensors.torch import load_file

    from robustfm.config import load_config
    from robustfm.models import create_model
    from robustfm.models.export import clip_state_dict
    from robustfm.recipes.fare_config import FARERecipeConfig
    from robustfm.recipes.kit import TaskBuilder

    create_model("open_clip/tiny-vit")  # registers the tiny config with open_clip
    exported = load_file(out / "export" / "finetune" / "model.safetensors")
    open_clip.create_model("tiny-vit").load_state_dict(exported)
    cfg = load_config(FARERecipeConfig, "configs/fare/demo.yaml")
    start = clip_state_dict(TaskBuilder("fare", cfg.model, cfg.method).initial(cfg.seed).model)
    text = [k for k in start if not k.startswith("visual.")]
    assert "logit_scale" in text and all(torch.equal(exported[k], start[k]) for k in text)
    assert any(not torch.equal(exported[k], start[k]) for k in start if k.startswith("visual."))


def test_the_teacher_target_is_f0_of_the_crop_the_task_sees(ray_session, demo_shards):
    import torch

    from robustfm.config import load_config
    from robustfm.recipes.fare import training_batches
    from robustfm.recipes.fare_config import FARERecipeConfig
    from robustfm.recipes.kit import TaskBuilder
    from robustfm.seeding import sample_seed

    overrides = [f"data.shards={demo_shards}", "data.batch_size=4", "data.teacher.num_cpus=0.25", "seed=5"]
    cfg = load_config(FARERecipeConfig, "configs/fare/demo.yaml", overrides)
    batch = next(iter(training_batches(cfg).batches(epoch=1, rank=0, world_size=1)))
    f0 = TaskBuilder("fare", cfg.model, cfg.method).initial(cfg.seed).eval()
    with torch.no_grad():
        torch.testing.assert_close(batch["target"], f0.model.encode_image(batch["image"]), atol=1e-5, rtol=1e-4)
    expected = [sample_seed(str(i), 1, "adversarial_start", 5) for i in batch["id"]]
    assert batch["attack_seed"].tolist() == expected
