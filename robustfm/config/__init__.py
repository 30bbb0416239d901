"""Typed configs: schemas, loading with overrides, validation, and the saved record of a run."""

from robustfm.config.core import (
    ConfigError,
    FrozenDict,
    check,
    flatten,
    from_dict,
    load_config,
    replace_path,
    replace_paths,
    to_dict,
)
from robustfm.config.run_record import git_sha, save_resolved_config
from robustfm.config.schema import ModelConfig, RayConfig, TrackingConfig, check_perturbation_grid

__all__ = [
    "ConfigError",
    "FrozenDict",
    "ModelConfig",
    "RayConfig",
    "TrackingConfig",
    "check",
    "check_perturbation_grid",
    "flatten",
    "from_dict",
    "git_sha",
    "load_config",
    "replace_path",
    "replace_paths",
    "save_resolved_config",
    "to_dict",
]
