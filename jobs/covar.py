"""Export COVAR's variants (originals, Bg-varied composites, flips, translations, crops, rotations, scales, with
their masks and drawn parameters) for inspection; no model, no Ray (robustfm/evals/covar_export.py).

python jobs/covar.py --export outputs/covar_export eval.suites.covar.data.shards=data/shards/objects \
    eval.suites.covar.backgrounds.folder=data/backgrounds
Score them: python jobs/evaluate.py --suite covar faithfulness --model open_clip/ViT-B-16@openai (same overrides).
"""

from __future__ import annotations

import sys

from robustfm.config.cli import job_argument_parser, resolve_job_config
from robustfm.evals.config import EvaluateJobConfig


def main(argv: list[str] | None = None) -> int:
    parser = job_argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--export", required=True, metavar="DIR", help="where the variants are written")
    parser.add_argument("--samples", type=int, default=8, help="images exported (the first by id)")
    parser.add_argument("--image-size", type=int, default=224, help="side of the exported images")
    args = parser.parse_args(argv)
    cfg = resolve_job_config(EvaluateJobConfig, args)
    from robustfm.evals.covar_export import export_variants

    try:
        summary = export_variants(
            cfg.eval.suites["covar"], args.export, image_size=args.image_size, samples=args.samples, seed=cfg.eval.seed
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {summary['files']} files of {summary['images']} images to {summary['out_dir']}")
    for sample, reason in summary["skipped"].items():
        print(f"  skipped {sample}: {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
