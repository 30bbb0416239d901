"""``jobs/evaluate.py --suite classification relevance_alignment`` on the demo set with masks (one actor, tiny timm
ViT): both suites score every image or count it, and land in the report card; bad settings fail before Ray."""

from __future__ import annotations

import json

import pytest

from tests.ray.test_covar_faithfulness_job import load_job

pytestmark = [pytest.mark.ray]


def test_unknown_method_and_missing_train_classes_fail_before_ray_with_exit_2(capsys):
    argv = [
        "--suite", "classification", "relevance_alignment", "--model", "timm/tiny-vit", "tracking.backend=none",
        "eval.suites.relevance_alignment.methods=[gea]", "eval.suites.classification.train_classes=missing.txt",
    ]  # fmt: skip
    assert load_job().main(argv) == 2
    err = capsys.readouterr().err
    assert "relevance_alignment.methods: unknown 'gea'; did you mean 'gae'" in err
    assert "classification.train_classes: 'missing.txt' does not exist" in err


@pytest.mark.timeout(300)
def test_classification_and_relevance_alignment_run_on_the_demo_with_masks(ray_session, tmp_path, capsys):
    from robustfm.testing.datasets import write_demo_shards

    shards = write_demo_shards(tmp_path / "demo", image_size=64, n_images=4, n_val=4, seed=3, with_masks=True)
    # The demo's classes (shape names, "horse") are no ImageNet folder names: found before any actor starts.
    imagenet = ["--suite", "classification", "--model", "timm/tiny-vit", "tracking.backend=none",
                f"eval.suites.classification.data.shards={shards}"]  # fmt: skip
    assert load_job().main(imagenet) == 2
    assert "is neither an ImageNet wnid, a class index" in capsys.readouterr().err
    out = tmp_path / "out"
    argv = [
        "--suite", "classification", "relevance_alignment", "--model", "timm/tiny-vit", "tracking.backend=none",
        f"eval.output_dir={out}", "eval.pool.min_actors=1", "eval.pool.max_actors=1", "eval.pool.batch_size=4",
        f"eval.suites.classification.data.shards={shards}", "eval.suites.classification.label_space=present",
        f"eval.suites.relevance_alignment.data.shards={shards}", "eval.suites.relevance_alignment.methods=[gae,random]",
    ]  # fmt: skip
    assert load_job().main(argv) == 0
    printed = capsys.readouterr().out
    assert "[classification] timm/tiny-vit: " in printed and "[relevance_alignment] timm/tiny-vit: " in printed

    model_dir = out / "timm_tiny-vit"
    classification = json.loads((model_dir / "classification" / "protocol.json").read_text())
    assert classification["counts"]["scored"] == 4 and classification["counts"]["rows"] == 4
    metrics = json.loads((model_dir / "classification" / "metrics.json").read_text())["metrics"]
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 1
    alignment = json.loads((model_dir / "relevance_alignment" / "protocol.json").read_text())
    # The demo's val split: 4 images with exact masks (shapes) or the horse silhouette; bad masks would be counted.
    counts = alignment["counts"]
    assert counts["scored"] + counts["skipped"] == 4 and counts["rows"] == 2 * counts["scored"] >= 2
    assert alignment["params"]["resolved"]["geometry"] == "stretch"
    metrics = json.loads((model_dir / "relevance_alignment" / "metrics.json").read_text())["metrics"]
    for method in ("gae", "random"):
        assert all(0 <= metrics[f"{method}/{k}"] <= 1 for k in ("pixel_accuracy", "miou", "map"))
    report = next((out / "report").rglob("report.md")).read_text()
    assert "mIoU (gae)" in report and "top-1" in report
