"""CFT, concept-guided fine-tuning (paper 001): relevance maps of a timm classifier aligned with concept masks
(robustfm/recipes/cft.py).

python jobs/cft.py --config configs/cft/demo.yaml                 # laptop: embedded Ray, tiny model, demo masks
ray job submit --working-dir . -- python jobs/cft.py --config configs/cft/vit_b16.yaml ray.address=auto
"""

from __future__ import annotations

from pathlib import Path

from robustfm.config import ConfigError
from robustfm.recipes.cft_config import CFTRecipeConfig, check_inputs
from robustfm.recipes.job import run_recipe_job

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cft" / "demo.yaml"


def preflight(cfg: CFTRecipeConfig) -> list[str]:
    """Missing data, masks or class names, and a relevance method the architecture cannot give (attnlrp on a CNN)."""
    problems = check_inputs(cfg)
    if problems:
        return problems
    from robustfm.recipes import kit

    try:
        kit.TaskBuilder("cft", cfg.model, cfg.method).initial(cfg.seed)
    except ConfigError as err:
        return [str(err)]
    return []


def main(argv: list[str] | None = None) -> int:
    return run_recipe_job(argv, __doc__, DEFAULT_CONFIG, CFTRecipeConfig, preflight, "robustfm.recipes.cft")


if __name__ == "__main__":
    raise SystemExit(main())
