"""Compare MLflow runs: the config values that differ, final metrics, metric curves and, for a sweep, parameters.

    python jobs/compare.py --experiment cgclip-demo                       # every top-level run of the experiment
    python jobs/compare.py --experiment cgclip-sweep --parent <run id> --metric val/auroc   # the trials of a sweep
    python jobs/compare.py --experiment cgclip-demo --runs run-a run-b --metric train/loss
Writes comparison.md, comparison.csv and PNG plots under --out and prints the table.
"""

from __future__ import annotations

import argparse
import sys

from robustfm.compare import compare_runs, load_runs, plot_metric_curves, plot_sweep, write_comparison
from robustfm.config import TrackingConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--runs", nargs="*", default=(), help="run ids or names (default: all top-level runs)")
    parser.add_argument("--parent", default=None, help="compare the child runs (trials) of this parent run id")
    parser.add_argument("--metric", nargs="*", default=(), help="metrics to show (default: all)")
    parser.add_argument("--target", default=None, help="metric for the sweep plots (default: the first --metric)")
    parser.add_argument(
        "--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or the local ./mlruns store"
    )
    parser.add_argument("--out", default=None, help="output folder (default: outputs/compare/<experiment>)")
    args = parser.parse_args(argv)

    from mlflow.tracking import MlflowClient

    uri = args.tracking_uri
    if uri is None:
        from robustfm.tracking import resolve_tracking_uri

        uri = resolve_tracking_uri(TrackingConfig(experiment=args.experiment))
    client = MlflowClient(tracking_uri=uri)
    try:
        runs = load_runs(client, args.experiment, args.runs, args.parent)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    comparison = write_comparison(compare_runs(runs, args.metric), args.out or f"outputs/compare/{args.experiment}")
    out_dir = comparison.files["markdown"].parent
    plots = plot_metric_curves(client, comparison, out_dir)
    target = args.target or (args.metric[0] if args.metric else None)
    if args.parent and target:
        plots += plot_sweep(comparison, target, out_dir)
    print(comparison.markdown())
    print(f"wrote {comparison.files['markdown']}, {comparison.files['csv']} and {len(plots)} plots in {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
