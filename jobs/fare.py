"""FARE adversarial fine-tuning of a CLIP image encoder (paper 003), measured before and after
(robustfm/recipes/fare.py).

python jobs/fare.py --config configs/fare/demo.yaml             # laptop: embedded Ray, tiny model
ray job submit --working-dir . -- python jobs/fare.py --config configs/fare/vit_l14_robustvlm.yaml ray.address=auto
"""

from __future__ import annotations

from pathlib import Path

from robustfm.recipes.fare_config import FARERecipeConfig, check_paths
from robustfm.recipes.job import run_recipe_job

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fare" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    # A missing data path fails in check_paths, before Ray starts.
    return run_recipe_job(argv, __doc__, DEFAULT_CONFIG, FARERecipeConfig, check_paths, "robustfm.recipes.fare")


if __name__ == "__main__":
    raise SystemExit(main())
