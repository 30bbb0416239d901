"""CG-CLIP end to end: Adapt-Isolate-Tune fine-tuning, milestone evaluations, export (robustfm/recipes/cgclip.py).

python jobs/cgclip.py --config configs/cgclip/demo.yaml              # laptop: embedded Ray, tiny model
ray job submit --working-dir . -- python jobs/cgclip.py --config configs/cgclip/vit_b32.yaml ray.address=auto
"""

from __future__ import annotations

from pathlib import Path

from robustfm.recipes.cgclip_config import CGClipRecipeConfig, check_paths
from robustfm.recipes.job import run_recipe_job

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cgclip" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    # A missing data path fails in check_paths, before Ray starts.
    return run_recipe_job(argv, __doc__, DEFAULT_CONFIG, CGClipRecipeConfig, check_paths, "robustfm.recipes.cgclip")


if __name__ == "__main__":
    raise SystemExit(main())
