"""CFT concept sets: keep the candidate concepts that occur and cover their class (paper 001 §3.2, App. §6-7).

python jobs/cft_concepts.py validate --concepts data/concepts --objects data/imagenet_s/train object_format=imagenet_s
python jobs/cft_concepts.py validate --config my.yaml min_occurrence=0.4 min_coverage=0.4 images_per_class=30

Layout, sampling and both stages: robustfm/data/concept_validation.py. Writes <output>/concepts.csv and concepts.json
(one row per class and concept: occurrence, coverage, kept, reason); a bad input exits with 2, naming the path.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from robustfm.config.cli import job_argument_parser, resolve_job_config
from robustfm.data.concept_validation import (
    ConceptInputError,
    ConceptValidationConfig,
    validate_concepts,
    write_tables,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser(
        "validate", parents=[job_argument_parser("Validate candidate concepts")], conflict_handler="resolve",
        help="occurrence, then coverage, on P images per class",
    )  # fmt: skip
    for name, what in (
        ("concepts", "folder of <class>/<stem>__<concept>.png"),
        ("objects", "folder of <class>/<stem>.png"),
        ("output", "where the tables go"),
    ):
        validate.add_argument(f"--{name}", metavar="DIR", help=f"{what} (same as {name}=DIR)")
    args = parser.parse_args(argv)
    shortcuts = [f"{n}={json.dumps(v)}" for n in ("concepts", "objects", "output") if (v := getattr(args, n))]
    args.overrides = shortcuts + list(args.overrides)
    cfg = resolve_job_config(ConceptValidationConfig, args)
    try:
        result = validate_concepts(cfg)
    except ConceptInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    csv_path, json_path = write_tables(result, cfg.output)
    print(result.summary())
    print(f"table: {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
