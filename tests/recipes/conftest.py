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
        # When a job starts its own embedded Ray (run_job(own_ray=True)): without the dashboard (~10 processes,
        # ~1 GB); nothing in a recipe job reads the State API. A job that joins the session's Ray ignores it.
        "ray.include_dashboard": "false",
    }
    overrides.update(extra)
    return [f"{key}={value}" for key, value in overrides.items()]


JOB_TIMEOUT_S = 1200
"""A job run's limit: ~2-4 minutes alone on two idle cores, but CI runs two tests side by side on a slower machine."""


def session_ray_address() -> str | None:
    """The GCS address of this test process's session Ray (``ray_session``), or None when it is not running."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().gcs_address


def job_environment(env: dict[str, str] | None = None, own_ray: bool = False) -> dict[str, str]:
    """The environment of a job run by a test: this process's, plus ``env``, plus ``$RAY_ADDRESS`` naming the
    session's Ray when this process has one, so the job joins it as a job submitted to a cluster does (the session's
    token authentication and State API address are inherited). An embedded Ray per job costs ~10 CPU-seconds of
    start-up and shutdown that the suite's two cores pay for. ``own_ray=True`` (or no session Ray) keeps the job's
    own embedded Ray: the path of ``python jobs/<recipe>.py`` on a laptop."""
    job_env = {**os.environ, **(env or {})}
    address = None if own_ray else session_ray_address()
    if address:
        job_env["RAY_ADDRESS"] = address
    else:
        job_env.pop("RAY_ADDRESS", None)
    return job_env


def run_job(
    args: list[str], timeout: int = JOB_TIMEOUT_S, env: dict[str, str] | None = None, own_ray: bool = False
) -> subprocess.CompletedProcess:
    """Run a job script with this interpreter, from the repository root (see :func:`job_environment`)."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=job_environment(env, own_ray),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
