"""TeCoA end to end through ``jobs/tecoa.py`` on the demo shards with DDP: labels and class names from the shards'
manifest, the attack inside the task, both milestones with robust zero-shot accuracy, the export, the summary."""

from __future__ import annotations

import json

import pytest

from tests.recipes.conftest import JOB_TIMEOUT_S, run_job
from tests.recipes.test_fare_job import fare_overrides

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.mark.timeout(JOB_TIMEOUT_S + 120)
def test_tecoa_runs_with_ddp_and_prints_where_results_are(demo_shards, tmp_path):
    overrides = fare_overrides(tmp_path, demo_shards, name="tecoa", **{"train.strategy.name": "ddp"})
    # Its own embedded Ray, as `python jobs/tecoa.py` on a laptop (the other job tests join the session's Ray).
    done = run_job(["jobs/tecoa.py", "--config", "configs/tecoa/demo.yaml", *overrides], own_ray=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "started an embedded Ray" in done.stdout + done.stderr
    out = tmp_path / "tecoa"
    train_state = json.loads((out / "stages" / "finetune" / "train_metrics.json").read_text())
    assert train_state["global_step"] == 4 and train_state["strategy"] == "ddp"
    assert train_state["finetune/loss/tecoa"] > 0
    milestones = json.loads((out / "milestones.json").read_text())
    assert set(milestones) == {"pretrained", "finetune"}
    assert all(f"zero_shot/apgd_ce_linf:{8 / 255:g}/robust_top1" in m for m in milestones.values())
    assert "TeCoA (paper 003's baseline) finished." in done.stdout
    assert str(out / "export" / "finetune" / "model.safetensors") in done.stdout
    resolved = (out / "resolved_config.yaml").read_text()
    assert "class_names: null" in resolved  # the manifest's names were used, not logged as config
