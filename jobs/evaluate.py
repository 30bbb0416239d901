"""Evaluate a model with registered suites; log one MLflow run per suite and write a markdown report card.

    python jobs/evaluate.py --suite all --model open_clip/tiny-vit eval.pool.max_actors=2
    python jobs/evaluate.py --suite corruption_detection zero_shot --model outputs/cgclip/export/model.safetensors \
        --compare-with open_clip/ViT-B-32@openai \
        eval.suites.zero_shot.data.shards=data/imagenet eval.suites.zero_shot.data.split=val

--model / --compare-with: ``family/arch`` (random init), ``family/arch@tag`` (pretrained tag), ``family/arch@PATH``
(local weights), or a ``.safetensors`` file / checkpoint directory whose architecture is in its metadata or resolved
config (see robustfm/evals/model_ref.py). Overrides are dotted paths into robustfm.evals.config.EvaluateJobConfig.
"""

from __future__ import annotations

import argparse
import sys

from robustfm.config.cli import job_argument_parser, resolve_job_config
from robustfm.evals.config import EvaluateJobConfig


def main(argv: list[str] | None = None) -> int:
    parser = job_argument_parser(__doc__.splitlines()[0])
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__
    parser.add_argument("--suite", nargs="+", required=True, help="suite names, or 'all'")
    parser.add_argument("--model", required=True, help="the model to evaluate (see above)")
    parser.add_argument("--compare-with", default=None, help="a second model for a side-by-side report card")
    args = parser.parse_args(argv)
    # `--suite a b key=value`: nargs="+" swallows trailing overrides; hand them back.
    args.overrides += [item for item in args.suite if "=" in item]
    args.suite = [item for item in args.suite if "=" not in item]
    cfg = resolve_job_config(EvaluateJobConfig, args)

    from robustfm.config import ConfigError
    from robustfm.evals.model_ref import ModelRefError
    from robustfm.recipes.evaluate import evaluate
    from robustfm.registry import UnknownNameError

    try:
        evaluate(cfg, args.suite, args.model, args.compare_with)
    except (ModelRefError, UnknownNameError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
