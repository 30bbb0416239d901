"""CFT end to end through ``jobs/cft.py`` on the demo shards with masks, on DeepSpeed ZeRO-2 (the design runs CFT's
double backward there; DDP and 2-worker equality are in tests/unit/test_cft_distributed.py); and every config error
the issue lists fails with exit code 2 before Ray starts, naming the field."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.recipes.conftest import REPO, run_job

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def load_job():
    spec = importlib.util.spec_from_file_location("cft_job", REPO / "jobs" / "cft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cft_overrides(out: Path, shards: str, **extra: str) -> list[str]:
    """The demo config cut to two batches and tiny evaluation sets."""
    overrides = {
        "output_dir": str(out),
        "name": "cft",
        "data.shards": shards,
        "data.images_per_class": "3",
        "data.batch_size": "4",
        "tracking.uri": f"sqlite:///{out}/mlflow.db",
        "train.storage_path": str(out / "runs"),
        "train.stages.finetune.epochs": "1",
        "train.stages.finetune.max_batches_per_epoch": "2",
        "eval.settings.suites.classification.data.max_samples": "8",
        "eval.settings.suites.relevance_alignment.data.max_samples": "8",
        "export.wise_ft_alphas": "[]",  # timm WiSE-FT: tests/unit/test_models_export_timm.py
        "ray.include_dashboard": "false",  # as in tiny_cgclip_overrides
    }
    overrides.update(extra)
    return [f"{key}={value}" for key, value in overrides.items()]


@pytest.fixture(scope="module")
def masked_shards(tmp_path_factory, ray_session) -> str:
    from robustfm.testing.datasets import write_demo_shards

    out = tmp_path_factory.mktemp("cft_data")
    return str(write_demo_shards(out, image_size=64, n_images=24, n_val=8, seed=5, with_masks=True))


@pytest.mark.timeout(1500)  # ~3 min on two idle cores; CI's are shared with the other pytest worker
def test_cft_runs_end_to_end_on_deepspeed_zero2(masked_shards, tmp_path):
    zero2 = {"train.strategy.name": "deepspeed", "train.strategy.zero_stage": "2"}
    command = ["jobs/cft.py", "--config", "configs/cft/demo.yaml", *cft_overrides(tmp_path, masked_shards, **zero2)]
    done = run_job(command, timeout=1400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "cft"
    assert "CFT (paper 001) finished." in done.stdout and str(out / "cft_table.md") in done.stdout
    metrics = json.loads((out / "stages" / "finetune" / "train_metrics.json").read_text())
    assert metrics["strategy"].startswith("deepspeed") and metrics["finetune/stage_step"] == 2
    assert all(f"finetune/loss/{name}" in metrics for name in ("concept", "non_concept", "cls"))
    classes = (out / "train_classes.txt").read_text().split()
    assert len(classes) == len(set(classes)) >= 2  # every demo class, each drawn once
    milestones = json.loads((out / "milestones.json").read_text())
    for name in ("pretrained", "finetune"):
        assert 0 <= milestones[name]["classification/top1"] <= 1
        assert 0 <= milestones[name]["relevance_alignment/gae/miou"] <= 1
    table = (out / "cft_table.md").read_text()
    assert "gae mIoU" in table and "| finetune |" in table
    assert (out / "export" / "finetune" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({}, "data.shards: {shards} has no 'mask' column"),
        ({"method.lambda_cls": "0.5", "train.stages.finetune.loss_weights.cls": "0.3"}, "loss_weights"),
        ({"train.strategy.name": "deepspeed", "train.strategy.zero_stage": "3"}, "train.strategy"),
        ({"method.lambda_concept": "-1"}, "method.lambda_concept"),
        ({"model.name": "open_clip/tiny-vit"}, "model.name"),
    ],
)
def test_bad_config_fails_before_ray_starts(demo_shards, tmp_path, capsys, overrides, message):
    argv = ["--config", "configs/cft/demo.yaml", *cft_overrides(tmp_path, demo_shards, **overrides)]
    assert exit_code(argv) == 2
    assert message.format(shards=demo_shards) in capsys.readouterr().err
    assert not (tmp_path / "cft").exists()  # stopped before its logs, Ray and the run


def exit_code(argv: list[str]) -> int | None:
    """What the job returns, or exits with when the config loader stops it."""
    try:
        return load_job().main(argv)
    except SystemExit as stop:
        return stop.code


def test_unknown_class_in_the_class_list_is_named_with_a_suggestion(demo_shards, tmp_path, capsys):
    from robustfm.config import load_config
    from robustfm.recipes.cft_config import CFTRecipeConfig, check_inputs

    listed = tmp_path / "classes.txt"
    listed.write_text("red_circle\nred_circel\n")
    cfg = load_config(CFTRecipeConfig, REPO / "configs" / "cft" / "demo.yaml",
                      [*cft_overrides(tmp_path, demo_shards), f"data.class_list={listed}"])  # fmt: skip
    problems = check_inputs(cfg)
    assert any("'red_circel'" in p and "did you mean 'red_circle'" in p for p in problems), problems
