"""The config of the TeCoA recipe (``jobs/tecoa.py``), validated before Ray starts. Imports no ray or open_clip."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from robustfm.config import TrackingConfig
from robustfm.config.core import ConfigError
from robustfm.methods.tecoa_config import TeCoAConfig, check_class_names
from robustfm.recipes import RECIPES
from robustfm.recipes.adversarial_config import AdversarialDataConfig, AdversarialRecipeConfig
from robustfm.recipes.kit_config import missing_inputs


@dataclass(frozen=True)
class TeCoARecipeConfig(AdversarialRecipeConfig):
    """``jobs/tecoa.py``: TeCoA supervised adversarial fine-tuning of a CLIP image encoder (paper 003's baseline).

    The shards must carry labels (``label``, and class names in their manifest or ``method.class_names_file``)."""

    name: str = "tecoa"
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="tecoa"))
    method: TeCoAConfig = field(default_factory=TeCoAConfig)
    data: AdversarialDataConfig = field(default_factory=AdversarialDataConfig)


def read_class_names(path: str) -> tuple[str, ...]:
    """One class name per non-empty line of ``path``, in label order; duplicates raise naming the field."""
    names = tuple(line.strip() for line in Path(path).read_text().splitlines() if line.strip())
    check_class_names(names, "method.class_names_file")
    return names


def class_names_of(cfg: TeCoARecipeConfig, manifest: dict) -> tuple[str, ...]:
    """The class names TeCoA prompts with, checked against the shards' ``manifest``: ``method.class_names``, else
    ``method.class_names_file``, else the manifest's ``classes``. Raises ConfigError naming the field at fault."""
    columns = manifest.get("columns", {})
    classes = list(manifest.get("classes") or [])
    if "label" not in columns or not classes:
        raise ConfigError(
            "data.shards",
            f"TeCoA needs labelled shards (a 'label' column and the manifest's classes); {cfg.data.shards} has "
            f"columns {sorted(columns)} and {len(classes)} classes",
        )
    if cfg.method.class_names is not None:
        names, where = tuple(cfg.method.class_names), "method.class_names"
    elif cfg.method.class_names_file is not None:
        names, where = read_class_names(cfg.method.class_names_file), "method.class_names_file"
    else:
        names, where = tuple(str(c) for c in classes), "data.shards"
        try:
            check_class_names(names, where)
        except ConfigError as err:
            raise ConfigError(where, f"the manifest's class list {err.message}") from None
    if len(names) != len(classes):
        raise ConfigError(where, f"has {len(names)} class names, the shards' labels index {len(classes)} classes")
    return names


def check_paths(cfg: TeCoARecipeConfig) -> list[str]:
    """Local inputs the run needs and lacks, as ``field: message`` lines: shards and splits, weights, the class
    names file, and labels with distinct class names in local shards."""
    data = cfg.data
    problems = missing_inputs(
        {"data.shards": (data.shards, {"data.train_split": data.train_split, "data.eval_split": data.eval_split})},
        {"model.pretrained": cfg.model.pretrained},
    )
    names_file = cfg.method.class_names_file
    if names_file is not None and not Path(names_file).is_file():
        problems.append(f"method.class_names_file: {names_file!r} does not exist")
    manifest = None if data.shards is None or data.shards.startswith("s3://") else Path(data.shards, "manifest.json")
    if not problems and manifest is not None:
        try:
            class_names_of(cfg, json.loads(manifest.read_text()))
        except ConfigError as err:
            problems.append(str(err))
    return problems


RECIPES.register_lazy(
    "tecoa",
    "robustfm.recipes.tecoa:run",
    config=TeCoARecipeConfig,
    default_config="configs/tecoa/demo.yaml",
    sweep="robustfm.recipes.tecoa:SWEEP",
    description="paper 003's TeCoA baseline: supervised adversarial fine-tuning of a CLIP image encoder",
)
