"""Robustness fine-tuning to everyday perturbations (paper 004), measured before and after
(robustfm/recipes/perturb_ft.py).

python jobs/perturb_ft.py --config configs/perturb_ft/demo.yaml             # laptop: embedded Ray, tiny model
ray job submit --working-dir . -- python jobs/perturb_ft.py --config configs/perturb_ft/vit_b32.yaml ray.address=auto
"""

from __future__ import annotations

from pathlib import Path

from robustfm.recipes.job import run_recipe_job
from robustfm.recipes.perturb_ft_config import PerturbFTRecipeConfig, check_paths

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "perturb_ft" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    # A missing data path fails in check_paths, before Ray starts.
    return run_recipe_job(
        argv, __doc__, DEFAULT_CONFIG, PerturbFTRecipeConfig, check_paths, "robustfm.recipes.perturb_ft"
    )


if __name__ == "__main__":
    raise SystemExit(main())
