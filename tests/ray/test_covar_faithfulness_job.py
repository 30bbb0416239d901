"""``jobs/evaluate.py --suite covar faithfulness`` on the demo set with masks, with a pool of 2 actors: both suites
score every image, count nothing as lost, and land in the report card; a missing background pool fails before Ray."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def load_job(path: Path = JOBS / "evaluate.py"):
    spec = importlib.util.spec_from_file_location(path.stem + "_job", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = [pytest.mark.ray]


def test_missing_background_pool_fails_before_ray_with_exit_2(capsys):
    argv = ["--suite", "covar", "--model", "open_clip/tiny-vit", "tracking.backend=none"]
    assert load_job().main(argv) == 2
    assert "eval.suites.covar.backgrounds: no background pool" in capsys.readouterr().err


@pytest.mark.timeout(900)
def test_covar_and_faithfulness_run_on_two_actors(ray_session, tmp_path, capsys):
    from robustfm.data.demo import write_background_folder
    from robustfm.testing.datasets import write_demo_shards

    shards = write_demo_shards(tmp_path / "demo", image_size=64, n_images=8, n_val=4, seed=3, with_masks=True)
    backgrounds = write_background_folder(tmp_path / "backgrounds", 64)
    out = tmp_path / "out"
    argv = [
        "--suite", "covar", "faithfulness", "--model", "open_clip/tiny-vit", "tracking.backend=none",
        f"eval.output_dir={out}", "eval.pool.min_actors=2", "eval.pool.max_actors=2", "eval.pool.num_cpus=0.5",
        "eval.pool.batch_size=3",
        f"eval.suites.covar.data.shards={shards}", f"eval.suites.covar.backgrounds.folder={backgrounds}",
        "eval.suites.covar.n_backgrounds=1", "eval.suites.covar.cci_k=3",
        f"eval.suites.faithfulness.data.shards={shards}", "eval.suites.faithfulness.methods=[cci,random]",
        "eval.suites.faithfulness.steps=4", "eval.suites.faithfulness.fraction_per_step=0.1",
        "eval.suites.faithfulness.cci_k=3",
    ]  # fmt: skip
    assert load_job().main(argv) == 0
    printed = capsys.readouterr().out
    # The val split is one shard file: it is cut into blocks so that both actors of the pool get work.
    assert "[covar] open_clip/tiny-vit: " in printed and printed.count("on 2 actor(s)") == 2, printed[-2000:]

    model_dir = out / "open_clip_tiny-vit"
    covar = json.loads((model_dir / "covar" / "protocol.json").read_text())
    faithfulness = json.loads((model_dir / "faithfulness" / "protocol.json").read_text())
    # The demo's val split: 4 images, each with an exact mask (shapes) or the horse silhouette.
    assert covar["counts"]["scored"] + covar["counts"]["skipped"] == 4
    assert covar["counts"]["rows"] == covar["counts"]["scored"] * (1 + 1 * (1 + 6))
    assert faithfulness["counts"]["scored"] == 4 and faithfulness["counts"]["rows"] == 4 * 2 * 2
    assert covar["params"]["resolved"]["backgrounds"]["count"] == 10
    metrics = json.loads((model_dir / "covar" / "metrics.json").read_text())["metrics"]
    assert 0 <= metrics["bg_varied/top1"] <= 1 and "class_drop/mean" in metrics
    report = next((out / "report").rglob("report.md")).read_text()
    assert "Bg-varied top-1" in report and "deletion AUC@1 (cci)" in report

    # The same variants, exported for inspection (no model, no Ray): PNGs with their masks and drawn parameters.
    export = tmp_path / "export"
    covar_job = load_job(JOBS / "covar.py")
    exported = [
        "--export", str(export), "--samples", "3", "--image-size", "64",
        f"eval.suites.covar.data.shards={shards}", f"eval.suites.covar.backgrounds.folder={backgrounds}",
        "eval.suites.covar.n_backgrounds=2",
    ]  # fmt: skip
    assert covar_job.main(exported) == 0
    summary = json.loads((export / "summary.json").read_text())
    assert summary["images"] + len(summary["skipped"]) == 3 and summary["images"] >= 1
    assert summary["files"] == summary["images"] * 2 * (1 + 2 * (1 + 6))
    folder = next(p for p in export.iterdir() if p.is_dir())
    params = json.loads((folder / "params.json").read_text())
    assert len(params) == 2 * 6 and {p["variant"] for p in params} == {"hflip", "vflip", "translate", "crop",
                                                                       "rotation", "scale"}  # fmt: skip
    rotations = sorted(folder.glob("rotation__*_mask.png"))
    assert len(rotations) == 2 and (folder / "original.png").is_file()
