"""Command-line parsing shared by the jobs: ``--config FILE`` then ``key.sub=value`` overrides."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from robustfm.config.core import ConfigError, load_config
from robustfm.config.run_record import config_yaml

T = TypeVar("T")


def job_argument_parser(description: str, default_config: str | Path | None = None) -> argparse.ArgumentParser:
    """An argument parser with ``--config``, ``--print-config`` and free ``key.sub=value`` overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=str(default_config) if default_config else None, help="YAML config file")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--verbose", action="store_true", help="also print Ray, Ray Data and library logs (default: the log file)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides, applied last")
    return parser


def resolve_job_config(schema: type[T], args: argparse.Namespace) -> T:
    """Load and validate the config; on a bad value print the field and exit 2 (nothing has started yet)."""
    try:
        config = load_config(schema, args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.print_config:
        print(config_yaml(config))
        raise SystemExit(0)
    return config


def parse_job_config(
    schema: type[T], argv: Sequence[str] | None, description: str, default_config: str | Path | None = None
) -> T:
    """``job_argument_parser`` + ``resolve_job_config`` in one call, for jobs with no arguments of their own."""
    args = job_argument_parser(description, default_config).parse_args(argv)
    return resolve_job_config(schema, args)
