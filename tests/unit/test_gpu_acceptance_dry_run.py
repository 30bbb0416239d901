"""The GPU acceptance check (benchmarks/gpu_acceptance.py) cannot rot between GPU windows: its dry run runs every item
on CPU with a tiny model and must report every one "ok"; the runner reports a hung or broken item and goes on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_acceptance  # noqa: E402
from gpu_items import ITEMS  # noqa: E402

OUTPUTS = ["gpu_acceptance.json", "gpu_acceptance.log", "gpu_acceptance.md"]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(2700)  # ~4 minutes on two idle cores; the items' own limits allow for a shared machine
def test_dry_run_runs_every_item_and_writes_the_report(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_acceptance.py", str(out), "--dry-run", "--workdir", str(tmp_path / "work")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=2600,
    )
    report = json.loads((out / "gpu_acceptance.json").read_text())
    failed = {name: r.get("error") or r["summary"] for name, r in report["items"].items() if r["status"] != "ok"}
    assert not failed, f"items not ok: {failed}\n{done.stdout[-3000:]}"
    assert list(report["items"]) == list(ITEMS)
    assert done.returncode == 0
    # Three files: the device tool brings back at most eight.
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS
    markdown = (out / "gpu_acceptance.md").read_text()
    for name in ITEMS:
        assert f"## {name}:" in markdown and f"| {name} | ok |" in markdown
    log = (out / "gpu_acceptance.log").read_text()
    assert all(f"===== {name} =====" in log for name in ITEMS)
    items = report["items"]
    # The numbers each item exists for are there (their values on a CPU say nothing).
    engine = items["engine"]["metrics"]
    assert engine["ddp"]["samples_per_s"] > 0 and engine["deepspeed"]["ratio_to_bare"] > 0
    assert engine["flops_per_sample"] > 0
    assert items["compile"]["metrics"]["compiled_samples_per_s"] > 0
    resume = items["resume"]["metrics"]
    assert resume["worker_processes"]["killed_and_resumed"] >= 2  # the kill happened
    assert items["resume"]["goal_met"] is True  # on CPU the resumed run is bit-identical
    agreement = items["corruptions"]["metrics"]["agreement"]
    assert len(agreement) == 19 and all(row["agrees"] is True for row in agreement if row["corruption"] != "frost")
    data = items["data_path"]["metrics"]
    assert set(data["rows_per_s"]) == {"decode", "corrupt", "gt_map"}
    assert data["ratio"] > 0 and "trainer_img_s" in data  # compared with the engine item's trainer
    assert items["eval_pool"]["metrics"]["images_per_s"] > 0
    stages = items["cgclip"]["metrics"]["stages"]
    assert set(stages) == {"adapt", "isolate", "tune"} and all(s["steps"] == 2 for s in stages.values()), stages


def test_an_item_over_its_time_limit_is_stopped_and_reported(tmp_path):
    result = gpu_acceptance.run_item("engine", "dry", tmp_path, 3, gpu_acceptance.item_environment(dry_run=True))
    assert result["status"] == "timeout"
    assert "limit of 3 s" in result["summary"]
    assert result["seconds"] < 60  # the process group was ended, not waited for


def test_an_item_that_fails_is_reported_with_its_error(tmp_path):
    result = gpu_acceptance.run_item("corruptions", "tpu", tmp_path, 120, gpu_acceptance.item_environment(True))
    assert result["status"] == "error"
    assert "profile must be 'gpu' or 'dry', got 'tpu'" in result["error"]


def test_the_report_shows_every_item_and_the_errors(tmp_path):
    items = {
        "engine": {"status": "ok", "summary": "ddp 1.01x", "goal_met": True, "goal": "ddp >= 1.0x",
                   "tables": {"throughput": [{"loop": "bare", "img/s": "3,000"}]}},
        "compile": {"status": "timeout", "summary": "stopped", "goal_met": None, "error": "last lines"},
        "resume": {"status": "error", "summary": "", "goal_met": None, "error": "Traceback: boom"},
        "cgclip": {"status": "skipped", "summary": "not started", "goal_met": None},
    }  # fmt: skip
    for name, item in items.items():
        item.update({"item": name, "title": ITEMS[name].title, "seconds": 1.0})
    report = {"profile": "gpu", "started": "now", "budget_s": 480, "seconds": 4, "environment": {}, "items": items}
    gpu_acceptance.write_outputs(tmp_path, report, tmp_path / "work")
    markdown = (tmp_path / "gpu_acceptance.md").read_text()
    assert "| engine | ok | yes | ddp 1.01x | 1 |" in markdown
    assert "| compile | timeout | - | stopped | 1 |" in markdown
    assert "| bare | 3,000 |" in markdown
    assert "Traceback: boom" in markdown and "last lines" in markdown
    assert json.loads((tmp_path / "gpu_acceptance.json").read_text())["items"]["resume"]["status"] == "error"
