"""Hyperparameter sweep of a recipe with Ray Tune over a search-space file (robustfm/sweeps/tune.py).

python jobs/sweep.py --recipe cgclip --space tune_spaces/cgclip_lambda_lr.yaml
python jobs/sweep.py --recipe cgclip --space tune_spaces/cgclip_lambda_grid.yaml data.shards=data/coco ray.address=auto
Rerunning the same command after an interruption resumes the sweep.
"""

from __future__ import annotations

import argparse
import sys

from robustfm.config import ConfigError
from robustfm.registry import UnknownNameError
from robustfm.runtime import configure_job_logging, init_ray
from robustfm.sweeps.tune import plan_sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="a sweepable recipe (cgclip, perturb_ft)")
    parser.add_argument("--space", required=True, help="search-space file (tune_spaces/*.yaml)")
    parser.add_argument("--name", default=None, help="sweep name (default: the space file's name); same name resumes")
    parser.add_argument(
        "--init-weights", default=None, help="task weights every trial starts from (space: init_weights)"
    )
    parser.add_argument("--verbose", action="store_true", help="also print Ray and library logs (default: a log file)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides of the recipe's base config")
    args = parser.parse_args(argv)
    try:  # every check happens here, before Ray starts
        plan = plan_sweep(args.recipe, args.space, args.name, args.overrides, args.init_weights)
    except (ConfigError, UnknownNameError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    configure_job_logging(plan.experiment_dir, verbose=args.verbose)
    init_ray(plan.base.ray, verbose=args.verbose)
    from robustfm.sweeps.tune import run_sweep

    result = run_sweep(plan)
    return 130 if result.interrupted else 0  # 130: the shell's code for a run stopped by Ctrl-C


if __name__ == "__main__":
    raise SystemExit(main())
