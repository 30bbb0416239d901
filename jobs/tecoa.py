"""TeCoA adversarial fine-tuning of a CLIP image encoder (paper 003's baseline), measured before and after
(robustfm/recipes/tecoa.py).

python jobs/tecoa.py --config configs/tecoa/demo.yaml             # laptop: embedded Ray, tiny model
ray job submit --working-dir . -- python jobs/tecoa.py --config configs/tecoa/vit_l14_robustvlm.yaml ray.address=auto
"""

from __future__ import annotations

from pathlib import Path

from robustfm.recipes.job import run_recipe_job
from robustfm.recipes.tecoa_config import TeCoARecipeConfig, check_paths

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tecoa" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    # A missing data path fails in check_paths, before Ray starts.
    return run_recipe_job(argv, __doc__, DEFAULT_CONFIG, TeCoARecipeConfig, check_paths, "robustfm.recipes.tecoa")


if __name__ == "__main__":
    raise SystemExit(main())
