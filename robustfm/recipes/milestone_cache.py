"""The milestone cache (``<output>/milestones/<name>.json``): a rerun reuses a milestone's metrics only when they were
measured with the same evaluation settings.

A cached record carries the fingerprint of the settings that shape its numbers: the ``eval`` section, the recipe's
``data`` section (evaluation splits, image size), the model and the seed. What only chooses which milestones run, or
where and on how many actors they are scored, is left out, so resizing the pool or asking for more milestones keeps
the cache; so is what only training reads (CG-CLIP's ground-truth maps). A record measured with other settings (or
written before records carried a fingerprint) is measured again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from robustfm.config import flatten

logger = logging.getLogger("robustfm.recipes")

_NOT_SHAPING = (
    # where and on how many actors a milestone is scored, and which milestones run
    "eval.milestones",
    "eval.settings.output_dir",
    "eval.settings.pool.min_actors",
    "eval.settings.pool.max_actors",
    "eval.settings.pool.num_cpus",
    "eval.settings.pool.resources",
    "eval.settings.pool.threads",
    "eval.settings.pool.batch_size",
    "eval.settings.pool.wait_for_min_actors_s",
    # CG-CLIP's ground-truth maps are training targets that no milestone reads; their scale is fitted only when some
    # stage weighs them, so an ablation without such a stage (FLYP-only) would otherwise not share the milestones of
    # the curriculum prefix it has in common with the others
    "data.gt_map",
)
"""Flattened settings that do not change a milestone's numbers."""


def evaluation_fingerprint(cfg: Any) -> str:
    """A short hash of the recipe settings that shape a milestone's numbers (see the module docstring)."""
    shaping = {"eval": cfg.eval, "data": cfg.data, "model": cfg.model, "seed": cfg.seed}  # flatten reads configs
    kept = {
        key: value
        for key, value in flatten(shaping).items()
        if not any(key == skip or key.startswith(skip + ".") for skip in _NOT_SHAPING)
    }
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_cached(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The cached record of a milestone, or None when there is none or it was measured with other settings."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("fingerprint") != fingerprint:
        logger.info("milestone %s: cached with other evaluation settings (%s): measured again", path.stem, path)
        return None
    return record


def write_cached(path: Path, record: dict[str, Any], fingerprint: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**record, "fingerprint": fingerprint}, indent=2))
