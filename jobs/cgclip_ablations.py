"""CG-CLIP's ablation table (paper 000, table 1) in one command: every preset of configs/cgclip/ablations/ plus
CG-CLIP itself and the CLIP + linear-probe baseline, trained and evaluated under the same base config.

    python jobs/cgclip_ablations.py --config configs/cgclip/demo.yaml
    ray job submit --working-dir . -- python jobs/cgclip_ablations.py \
        --config configs/cgclip/vit_b32.yaml ray.address=auto
Variants that share a prefix of the curriculum share its training (same output folder). Writes ablations.md.
"""

from __future__ import annotations

from pathlib import Path

from robustfm.config.cli import job_argument_parser, resolve_job_config
from robustfm.recipes.cgclip_config import CGClipRecipeConfig, check_paths

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "cgclip" / "ablations"


def main(argv: list[str] | None = None) -> int:
    parser = job_argument_parser(__doc__, PRESETS.parent / "demo.yaml")
    parser.add_argument("--presets", nargs="*", default=None, help="preset names (default: every file in ablations/)")
    args = parser.parse_args(argv)
    base = resolve_job_config(CGClipRecipeConfig, args)
    from robustfm.recipes.cgclip_ablations import load_variants, run_ablations
    from robustfm.recipes.job import launch

    variants = load_variants(base, PRESETS, args.presets)  # every variant is validated before Ray starts

    return launch(base, check_paths(base), args.verbose, lambda: run_ablations(base, variants))


if __name__ == "__main__":
    raise SystemExit(main())
