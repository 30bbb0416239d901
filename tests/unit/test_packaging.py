"""What ships where: `import robustfm` stays light, and `ray job submit --working-dir .` uploads code only."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("ray", "deepspeed", "open_clip", "mlflow", "timm")
LIGHT_MODULES = ("robustfm", "robustfm.config", "robustfm.registry", "robustfm.seeding", "robustfm.config.cli")


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_import_does_not_pull_heavy_frameworks(module):
    code = f"import sys, {module}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "", f"importing {module} imported {done.stdout.strip()}"


@pytest.mark.parametrize("respect_gitignore", [True, False])
def test_job_upload_contains_code_only(tmp_path, respect_gitignore):
    """Zip a checkout exactly as Ray's runtime_env packaging does for ``--working-dir .``."""
    from ray._private.runtime_env.packaging import _zip_files

    checkout = tmp_path / "checkout"
    # Code in folders named like run outputs (robustfm/data, .../checkpoint.py) must still travel.
    code = [
        "robustfm/registry.py",
        "robustfm/data/shards.py",
        "robustfm/train/checkpoint.py",
        "jobs/cgclip.py",
        "configs/cgclip/demo.yaml",
        "pyproject.toml",
    ]
    # What a user's checkout holds after a few runs; none of it may travel.
    planted = [
        ".git/HEAD",
        ".venv/lib/x.py",
        "mlruns/mlflow.db",
        "mlflow.db",
        "data/shards/part-0.parquet",
        "checkpoints/step_10/model.pt",
        "outputs/demo/model.safetensors",
        ".cache/ds/op.so",
        "robustfm/__pycache__/registry.cpython-311.pyc",
    ]
    for rel in code + planted:
        (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
        (checkout / rel).write_bytes(b"x")
    for ignore_file in (".gitignore", ".rayignore"):
        (checkout / ignore_file).write_text((REPO / ignore_file).read_text())

    out = tmp_path / "pkg.zip"
    _zip_files(str(checkout), [], str(out), include_gitignore=respect_gitignore)
    files = {n for n in zipfile.ZipFile(out).namelist() if not n.endswith("/")}
    assert files == set(code) | {".gitignore", ".rayignore"}, f"would be uploaded: {sorted(files - set(code))}"
