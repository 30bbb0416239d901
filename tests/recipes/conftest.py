"""Shared by the recipe tests: the demo shards (built once) and a tiny CG-CLIP config as command-line overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory, ray_session) -> str:
    """The demo data set (scikit-image photos + generated shapes, with captions) as shards, through prepare_data."""
    from robustfm.testing.datasets import write_demo_shards

    return str(write_demo_shards(tmp_path_factory.mktemp("demo_data"), image_size=64, n_images=48, n_val=16, seed=0))


def tiny_cgclip_overrides(out: Path, shards: str, **extra: str) -> list[str]:
    """Overrides of configs/cgclip/demo.yaml that keep a whole run to about a minute on 2 cores."""
    overrides = {
        "output_dir": str(out),
        "data.shards": shards,
        "tracking.uri": f"sqlite:///{out}/mlflow.db",
        "train.storage_path": str(out / "runs"),
        "train.stages.adapt.epochs": "1",  # the demo trains Adapt for 12
        "train.stages.adapt.max_batches_per_epoch": "2",
        "train.stages.isolate.max_batches_per_epoch": "2",
        "train.stages.tune.max_batches_per_epoch": "2",
        "eval.tsne_samples": "12",
        "eval.settings.suites.corruption_detection.data.max_samples": "12",
        "eval.settings.suites.corruption_detection.corruptions": "[gaussian_noise,shot_noise]",
        "eval.settings.suites.zero_shot.data.max_samples": "12",
        "eval.settings.suites.zero_shot.corruptions": "[gaussian_noise]",
        "eval.settings.suites.zero_shot.perturbations": "[brightness]",
        "eval.settings.suites.zero_shot.perturbation_steps": "2",
        "export.wise_ft_alphas": "[]",
        # Its own embedded Ray without the dashboard (~10 processes, ~1 GB): nothing in a recipe job reads the State
        # API, and two jobs side by side on CI's 2 cores starved with them (`ray job submit` runs on a head of its own).
        "ray.include_dashboard": "false",
    }
    overrides.update(extra)
    return [f"{key}={value}" for key, value in overrides.items()]


JOB_TIMEOUT_S = 1200
"""A job run's limit: ~2-4 minutes alone on two idle cores, but CI runs two tests side by side on a slower machine."""


def run_job(
    args: list[str], timeout: int = JOB_TIMEOUT_S, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a job script with this interpreter, from the repository root."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
