"""Robustness fine-tuning to everyday perturbations (paper 004), measured before and after
(robustfm/recipes/perturb_ft.py).

python jobs/perturb_ft.py --config configs/perturb_ft/demo.yaml             # laptop: embedded Ray, tiny model
ray job submit --working-dir . -- python jobs/perturb_ft.py --config configs/perturb_ft/vit_b32.yaml ray.address=auto
"""

from __future__ import annotations

import sys
from pathlib import Path

from robustfm.config.cli import job_argument_parser, resolve_job_config
from robustfm.recipes.perturb_ft_config import PerturbFTRecipeConfig, check_paths
from robustfm.runtime import configure_job_logging, init_ray

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "perturb_ft" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    args = job_argument_parser(__doc__, DEFAULT_CONFIG).parse_args(argv)
    cfg = resolve_job_config(PerturbFTRecipeConfig, args)
    problems = check_paths(cfg)  # a missing data path fails here, before Ray starts
    if problems:
        print("config error: " + "\n  ".join(problems), file=sys.stderr)
        return 2
    configure_job_logging(Path(cfg.output_dir) / cfg.name, verbose=args.verbose)
    init_ray(cfg.ray, verbose=args.verbose)
    from robustfm.recipes.perturb_ft import run

    run(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
