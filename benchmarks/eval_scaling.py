"""Throughput of an evaluation suite's actor pool with 1, 2 (and more) actors, each limited to one thread.

    python benchmarks/eval_scaling.py                        # embedding_robustness, tiny CLIP, 1 and 2 actors
    python benchmarks/eval_scaling.py --actors 1 2 4 8 --model open_clip/ViT-B-32 --samples 256
    python benchmarks/eval_scaling.py --suite two_afc --set 'threats=[]' --samples 4096 --batch-size 64  # 2AFC clean
    python benchmarks/eval_scaling.py --suite two_afc --set attack_steps=10 --samples 32   # 2AFC robust (Linf, L2)
    python benchmarks/eval_scaling.py --suite covar --actor-cpus 0.5 --batch-size 4 --set data.shards=SHARDS \
        --set data.split=val --set backgrounds.folder=BACKGROUNDS          # COVAR on shards with masks

Each actor reserves 1 CPU and runs ``torch.set_num_threads(1)``, so N actors use N cores and the comparison is fair
on a 2-core machine. Throughput is measured inside the actors, from the start of the first batch to the end of the
last one (model construction, which happens once per actor, is excluded). Actor counts above the machine's cores are
skipped.

A shared machine's load changes over minutes, so one comparison proves little. The actor counts run ``--repeats``
times (default 5) in alternating order (1, 2, ... then ..., 2, 1), each repeat giving its own ratio to 1 actor; the
min / median / max of each ratio over the repeats are printed, and pass or fail is decided on the MEDIAN (target:
>= 1.7x with 2 actors).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import numpy as np


def timed(scorer_class: type) -> type:
    """The suite's scorer, with each output row stamped with its batch's start and end (wall clock)."""

    class Timed(scorer_class):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            start, cpu_start = time.time(), time.process_time()
            out = super().__call__(batch)
            count = len(out["id"])
            out["batch_start"] = np.full(count, start)
            out["batch_end"] = np.full(count, time.time())
            out["batch_cpu_s"] = np.full(count, time.process_time() - cpu_start)
            out["batch_images"] = np.full(count, len(batch["id"]))
            return out

    Timed.__name__ = Timed.__qualname__ = f"Timed{scorer_class.__name__}"
    return Timed


def measure(suite_name: str, model: str, cfg: Any) -> tuple[float, int, float, float]:
    """Images per second of the pool (first batch start to last batch end), how many actors scored batches, and how
    many cores the pool actually got (CPU seconds of the actors / elapsed): on a shared machine this says whether
    the actors could run in parallel at all; and images per CPU-second of the actors."""
    from robustfm.evals import SUITES
    from robustfm.evals.model_ref import parse_model_ref
    from robustfm.evals.runner import score_rows

    suite = SUITES.get(suite_name)(cfg)
    suite.scorer = timed(type(suite).scorer)
    rows, _ = score_rows(suite, parse_model_ref(model), cfg)
    # One row per (image, perturbation): count images through the first row of each batch.
    keys = zip(rows["batch_start"], rows["actor_pid"], rows["batch_images"], rows["batch_cpu_s"], strict=True)
    batches = {(float(s), int(p)): (int(n), float(c)) for s, p, n, c in keys}
    elapsed = float(rows["batch_end"].max() - rows["batch_start"].min())
    images = sum(n for n, _ in batches.values())
    cpu = sum(c for _, c in batches.values())
    return images / elapsed, len(set(rows["actor_pid"].tolist())), cpu / elapsed, images / cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="embedding_robustness")
    parser.add_argument("--model", default="open_clip/tiny-vit")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="alternating repeats (>= 5 advised); median decides")
    parser.add_argument(
        "--actor-cpus", type=float, default=1.0,
        help="CPUs each actor reserves (suites that read shards: 0.5, so that Ray Data's read tasks can run beside "
        "actors that hold every core; each actor still runs one thread)",
    )  # fmt: skip
    parser.add_argument("--actors", type=int, nargs="+", default=None, help="default: 1, 2, 4, ... up to the cores")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="a field of the suite's section (YAML value)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    import ray
    import yaml

    from robustfm.config import replace_path
    from robustfm.evals import SUITES
    from robustfm.evals.config import EvalConfig

    SUITES.check(args.suite)

    cores = os.cpu_count() or 1
    counts = args.actors or [n for n in (1, 2, 4, 8, 16, 32) if n <= max(2, cores)]
    skipped = [n for n in counts if n > cores]
    counts = [n for n in counts if n <= cores]
    ray.init(num_cpus=max(counts), include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    ray.data.DataContext.get_current().enable_progress_bars = False
    configs = {}
    for actors in counts:
        cfg = EvalConfig(seed=0)
        for path, value in {
            f"suites.{args.suite}.data.synthetic_samples": args.samples,
            "pool.min_actors": actors, "pool.max_actors": actors, "pool.num_cpus": args.actor_cpus, "pool.threads": 1,
            "pool.batch_size": args.batch_size,
        }.items():  # fmt: skip
            cfg = replace_path(cfg, path, value)
        if args.suite == "embedding_robustness":
            cfg = replace_path(cfg, "suites.embedding_robustness.steps", 5)
        for setting in args.set:
            field, _, value = setting.partition("=")
            cfg = replace_path(cfg, f"suites.{args.suite}.{field}", yaml.safe_load(value))
        configs[actors] = cfg
    measured: dict[int, list[float]] = {actors: [] for actors in counts}
    for repeat in range(args.repeats):
        order = counts if repeat % 2 == 0 else counts[::-1]  # neither side always runs first
        for actors in order:
            throughput, used, cores_used, per_cpu = measure(args.suite, args.model, configs[actors])
            measured[actors].append(throughput)
            print(
                f"eval_scaling run {repeat + 1}/{args.repeats}: actors={actors} (used {used}) "
                f"images/s={throughput:.2f} cores_used_by_pool={cores_used:.2f} images_per_cpu_s={per_cpu:.2f}",
                flush=True,
            )
    for actors, values in measured.items():
        ratios = [value / base for value, base in zip(values, measured[counts[0]], strict=True)]
        print(
            f"eval_scaling suite={args.suite} model={args.model} actors={actors} threads/actor=1 "
            f"images/s median {statistics.median(values):.2f} (min {min(values):.2f}, max {max(values):.2f}); "
            f"ratio_vs_1_actor median {statistics.median(ratios):.2f}x (min {min(ratios):.2f}x, "
            f"max {max(ratios):.2f}x) over {args.repeats} repeats"
        )
    if 2 in measured and 1 in measured:
        ratio = statistics.median(a / b for a, b in zip(measured[2], measured[1], strict=True))
        verdict = "OK" if ratio >= 1.7 else "BELOW TARGET"
        settings = f" with {' '.join(args.set)}" if args.set else ""
        print(
            f"eval_scaling {args.suite}{settings}: 2 actors vs 1, median of {args.repeats} repeats: {ratio:.2f}x "
            f"(target >= 1.7x): {verdict}"
        )
    for actors in skipped:
        print(f"eval_scaling actors={actors}: skipped, this machine has {cores} cores")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
