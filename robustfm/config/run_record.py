"""Saving the resolved config of a run, with the code version it ran."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from robustfm.config.core import to_dict

GIT_SHA_ENV = "ROBUSTFM_GIT_SHA"
RESOLVED_CONFIG_NAME = "resolved_config.yaml"


def git_sha() -> str:
    """The commit the code runs at (``+dirty`` when the tree has changes), ``$ROBUSTFM_GIT_SHA``, or ``unknown``.

    ``ray job submit --working-dir .`` uploads no ``.git``: the submitting side passes the SHA in the environment.
    """
    if os.environ.get(GIT_SHA_ENV):
        return os.environ[GIT_SHA_ENV]
    repo = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}+dirty" if dirty else sha


def config_yaml(config: Any) -> str:
    """The resolved config as YAML, headed by comments naming the git SHA and the time it was resolved."""
    header = (
        "# robustfm resolved config: every default, file value and override, as the run used them\n"
        f"# git_sha: {git_sha()}\n"
        f"# resolved_at: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}\n"
    )
    return header + yaml.safe_dump(to_dict(config), sort_keys=False)


def save_resolved_config(config: Any, directory: str | Path) -> Path:
    """Write ``resolved_config.yaml`` into ``directory`` (created) and return its path. It loads back as a config."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / RESOLVED_CONFIG_NAME
    path.write_text(config_yaml(config))
    return path
