"""What every recipe job (``jobs/<recipe>.py``) does around its recipe: parse the config, refuse bad input before
Ray starts, send library logs to the run's log file, start or join Ray, run."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from robustfm.config.cli import job_argument_parser, resolve_job_config
from robustfm.runtime import configure_job_logging, init_ray

T = TypeVar("T")


def launch(cfg: Any, problems: Sequence[str], verbose: bool, body: Callable[[], None]) -> int:
    """Exit code 2 with ``problems`` printed (nothing started), else set up logging and Ray, run ``body``, 0."""
    if problems:
        print("config error: " + "\n  ".join(problems), file=sys.stderr)
        return 2
    configure_job_logging(Path(cfg.output_dir) / cfg.name, verbose=verbose)
    init_ray(cfg.ray, verbose=verbose)
    body()
    return 0


def run_recipe_job(
    argv: Sequence[str] | None,
    description: str,
    default_config: Path,
    schema: type[T],
    preflight: Callable[[T], list[str]],
    recipe: str,
) -> int:
    """A recipe job's ``main``: ``preflight(cfg)`` names what is missing or impossible (input paths, masks, a setting
    the model cannot honour); the recipe module (``robustfm.recipes.<name>``, imported only once the checks pass:
    it pulls in torch and Ray) gets the config through its ``run``."""
    args = job_argument_parser(description, default_config).parse_args(argv)
    cfg = resolve_job_config(schema, args)
    return launch(cfg, preflight(cfg), args.verbose, lambda: importlib.import_module(recipe).run(cfg))
