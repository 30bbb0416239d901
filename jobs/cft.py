"""CFT, concept-guided fine-tuning (paper 001): relevance maps of a timm classifier aligned with concept masks
(robustfm/recipes/cft.py).

python jobs/cft.py --config configs/cft/demo.yaml                 # laptop: embedded Ray, tiny model, demo masks
ray job submit --working-dir . -- python jobs/cft.py --config configs/cft/vit_b16.yaml ray.address=auto
"""

from __future__ import annotations

import sys
from pathlib import Path

from robustfm.config import ConfigError
from robustfm.config.cli import job_argument_parser, resolve_job_config
from robustfm.recipes.cft_config import CFTRecipeConfig, check_inputs
from robustfm.runtime import configure_job_logging, init_ray

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cft" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    args = job_argument_parser(__doc__, DEFAULT_CONFIG).parse_args(argv)
    cfg = resolve_job_config(CFTRecipeConfig, args)
    problems = check_inputs(cfg)  # missing data, masks or class names fail here, before Ray starts
    if problems:
        print("config error: " + "\n  ".join(problems), file=sys.stderr)
        return 2
    from robustfm.recipes import kit

    try:  # a relevance method the architecture cannot give (attnlrp on a CNN) fails before Ray starts too
        kit.TaskBuilder("cft", cfg.model, cfg.method).initial(cfg.seed)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    configure_job_logging(Path(cfg.output_dir) / cfg.name, verbose=args.verbose)
    init_ray(cfg.ray, verbose=args.verbose)
    from robustfm.recipes.cft import run

    run(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
