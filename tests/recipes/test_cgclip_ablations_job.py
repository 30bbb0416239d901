"""jobs/cgclip_ablations.py end to end on the tiny config: two presets plus CG-CLIP and the probe baseline in one
table (markdown and MLflow), each shared curriculum prefix trained and evaluated once. Two presets whose curricula are
prefixes of CG-CLIP's show the sharing; every preset is checked to apply in tests/unit/test_cgclip_ablations.py (each
further preset here would cost another Ray Train run and milestone evaluation, ~1-2 minutes of CI)."""

from __future__ import annotations

import math

import pytest

from tests.recipes.conftest import JOB_TIMEOUT_S, run_job, tiny_cgclip_overrides

VARIANTS = {
    "CLIP + linear probe (pretrained)": None,
    "cgclip (adapt > isolate > tune)": "adapt-isolate-tune",
    "flyp_only (adapt)": "adapt",
    "no_tune (adapt > isolate)": "adapt-isolate",
}


def _table_rows(markdown: str) -> dict[str, dict[str, str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return {row[0]: dict(zip(header, row, strict=True)) for row in rows}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(JOB_TIMEOUT_S + 120)
def test_ablation_job_writes_the_whole_table_training_each_prefix_once(demo_shards, tmp_path):
    from mlflow import MlflowClient

    overrides = tiny_cgclip_overrides(
        tmp_path,
        demo_shards,
        name="abl",
        **{
            "train.stages.joint.max_batches_per_epoch": "2",
            "train.stages.adapt.epochs": "1",
            "train.stages.isolate.epochs": "1",
            "train.stages.tune.epochs": "1",
            "train.stages.joint.epochs": "1",
            "eval.tsne": "false",
            "eval.suites": "[corruption_detection]",
            "tracking.experiment": "ablations",
        },
    )
    job = ["jobs/cgclip_ablations.py", "--config", "configs/cgclip/demo.yaml", *overrides]
    done = run_job([*job, "--presets", "flyp_only", "no_tune"])
    assert done.returncode == 0, done.stderr[-4000:]

    table_path = tmp_path / "abl" / "ablations.md"
    table = table_path.read_text()
    assert str(table_path) in done.stdout and table in done.stdout
    rows = _table_rows(table)
    assert list(rows) == list(VARIANTS)
    seen_probe, seen_zero_shot = "seen AUROC (probe)", "seen AUROC (zero-shot)"
    for name, row in rows.items():
        assert 0.0 <= float(row[seen_probe]) <= 1.0, name
        zero_shot = float(row[seen_zero_shot])
        assert math.isnan(zero_shot) if VARIANTS[name] is None else 0.0 <= zero_shot <= 1.0, name
    # Isolate freezes both encoders: w/o Tune detects exactly as FLYP-only does (paper 000, table 1).
    for column in (seen_probe, seen_zero_shot, "unseen AUROC (probe)", "unseen AUROC (zero-shot)"):
        assert rows["no_tune (adapt > isolate)"][column] == rows["flyp_only (adapt)"][column], column

    # Three distinct milestones, each trained by exactly one Ray Train run.
    milestones = {m for m in VARIANTS.values() if m is not None}
    assert {p.name for p in (tmp_path / "runs").iterdir() if p.is_dir()} == {f"abl-{m}" for m in milestones}
    for milestone in milestones:
        assert (tmp_path / "abl" / "stages" / milestone / "task.safetensors").is_file()

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("ablations")
    # ... and each milestone (the pretrained model, every prefix) evaluated once: the variants share the cache.
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    evaluated = [r.info.run_name for r in runs if r.data.tags.get("milestone")]
    assert sorted(evaluated) == sorted(f"milestone-{m}" for m in ["pretrained", *milestones]), evaluated
    table_runs = client.search_runs([experiment.experiment_id], "tags.kind = 'ablation-table'")
    assert len(table_runs) == 1
    run = table_runs[0]
    key = "cgclip/corruption_detection/probe/set/seen/auroc"
    assert run.data.metrics[key] == pytest.approx(float(rows["cgclip (adapt > isolate > tune)"][seen_probe]), abs=1e-4)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "ablations.md" in artifacts
