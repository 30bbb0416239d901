"""TeCoA adversarial fine-tuning of a CLIP image encoder (paper 003's baseline), measured before and after
(robustfm/recipes/tecoa.py).

python jobs/tecoa.py --config configs/tecoa/demo.yaml             # laptop: embedded Ray, tiny model
ray job submit --working-dir . -- python jobs/tecoa.py --config configs/tecoa/vit_l14_robustvlm.yaml ray.address=auto
"""

from __future__ import annotations

import sys
from pathlib import Path

from robustfm.config.cli import job_argument_parser, resolve_job_config
from robustfm.recipes.tecoa_config import TeCoARecipeConfig, check_paths
from robustfm.runtime import configure_job_logging, init_ray

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tecoa" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    args = job_argument_parser(__doc__, DEFAULT_CONFIG).parse_args(argv)
    cfg = resolve_job_config(TeCoARecipeConfig, args)
    problems = check_paths(cfg)  # a missing data path fails here, before Ray starts
    if problems:
        print("config error: " + "\n  ".join(problems), file=sys.stderr)
        return 2
    configure_job_logging(Path(cfg.output_dir) / cfg.name, verbose=args.verbose)
    init_ray(cfg.ray, verbose=args.verbose)
    from robustfm.recipes.tecoa import run

    run(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
