"""Fidelity of FARE (paper 003): after FARE, is the image encoder more robust than the starting model, by the two
measures the paper uses: robust zero-shot accuracy under APGD, and the FARE distance under attack (how far an attack
can push an embedding from where the starting model puts the clean image)? And how much clean accuracy is kept?

    python benchmarks/fidelity_fare.py                     # 3 seeds on the demo data: ~15 min on 2 quiet CPU cores
    python benchmarks/fidelity_fare.py --seeds 0 1 2 3 4 --epochs 8

What it runs, per seed, through the real recipe (robustfm/recipes/fare.py: the attack-seed and frozen-teacher Ray Data
stages, Ray Train with the attack inside the task, the ``zero_shot`` suite with APGD-CE on an actor pool): the tiny
registered CLIP ``open_clip/tiny-vit`` from RANDOM initialisation (no pretrained CLIP exists offline; the "starting
model" is that random init, and f0 is the same network), fine-tuned with FARE (PGD 10 x 1/255 at Linf 8/255, as
configs/fare/demo.yaml) on the demo set's training split, measured on its held-out ``val`` split (48 images), which
training never sees. Then, on the driver, the FARE distance under attack on the same val images: APGD-100 maximizing
||f(x + delta) - f0(x)||^2 in the same ball, for f = the starting model and f = the fine-tuned export.

The milestones also run the ``two_afc`` suite on 48 demo 2AFC triplets (a reference, its near copy and another
picture: robustfm/data/demo_two_afc.py), clean and with APGD-100 on the reference at the training radius (Linf 8/255):
paper 003's central claim is that the robust encoder makes a perceptual metric an attacker cannot fool.

Paired per seed (the same seed sets the starting model, the data order, the attacks and the evaluation draws), with
95% t-intervals over seeds. Checks (exit status 1 on FAIL): the paired gain in robust zero-shot top-1 (APGD-CE 100
iterations, logits scaled by the model's temperature) has its CI's lower bound above 0, and so have the paired drop of
the FARE distance under attack and the paired gain in robust 2AFC accuracy. Clean zero-shot top-1, its retention and
clean 2AFC accuracy are reported as they come out (a random-init text tower makes zero-shot small and noisy).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fidelity_common import REPO, run_seeded_fidelity

DEMO_CONFIG = REPO / "configs" / "fare" / "demo.yaml"
EPS = 8 / 255


def overrides(out: Path, shards: str, triplets: Path, seed: int, epochs: int) -> list[str]:
    values = {
        "name": f"seed{seed}",
        "seed": str(seed),
        "output_dir": str(out / "runs"),
        "tracking.backend": "none",
        "data.shards": shards,
        "train.storage_path": str(out / "checkpoints"),
        "train.log_every_steps": "20",
        "train.stages.finetune.epochs": str(epochs),
        "train.stages.finetune.schedule": "constant",
        "eval.settings.seed": str(seed),
        "eval.settings.suites.zero_shot.data.max_samples": "null",
        "eval.settings.suites.zero_shot.attack_samples": "null",
        "eval.settings.suites.zero_shot.attack_steps": "100",
        "eval.settings.suites.embedding_robustness.data.max_samples": "null",
        "eval.settings.suites.two_afc.data.shards": str(triplets),
        "eval.settings.suites.two_afc.data.split": "test",
        "eval.settings.suites.two_afc.threats": f"[{{norm: linf, eps: {EPS!r}}}]",
        "eval.settings.suites.two_afc.attack_steps": "100",
        "eval.settings.suites.two_afc.attack_samples": "null",
        "export.wise_ft_alphas": "[]",
    }
    return [f"{k}={v}" for k, v in values.items()]


def fare_distance(model, images, target, seed: int) -> float:  # noqa: ANN001
    """Mean over images of the highest ||f(x + delta) - f0(x)||^2 APGD-100 finds in the Linf 8/255 ball."""
    from robustfm.attacks import AttackConfig, apgd

    config = AttackConfig(eps=EPS, steps=100, objective="embedding_l2", seed=seed)
    result = apgd(model.encode_image, images, {"target": target}, config, eval_modules=model)
    if bool(result.failed.any()):
        raise RuntimeError(f"{int(result.failed.sum())} rows had a non-finite loss or gradient")
    return float(result.loss.mean())


def run_seed(seed: int, args: argparse.Namespace, shards: str) -> dict[str, dict[str, float]]:
    import torch

    from robustfm.config import load_config
    from robustfm.data import ShardBatchSource
    from robustfm.data.demo_two_afc import write_demo_two_afc
    from robustfm.models import create_model
    from robustfm.recipes.fare import run
    from robustfm.recipes.fare_config import FARERecipeConfig
    from robustfm.recipes.kit import TaskBuilder

    # 96 demo 2AFC triplets (48 test): a reference, its near copy and another picture (built once, shared by seeds).
    triplets = write_demo_two_afc(args.output_dir / "demo_two_afc", image_size=64, per_split=48)
    values = overrides(args.output_dir, shards, triplets, seed, args.epochs)
    cfg = load_config(FARERecipeConfig, DEMO_CONFIG, values)
    started = time.perf_counter()
    record = run(cfg)
    headline = cfg.headline()
    start = TaskBuilder("fare", cfg.model, cfg.method).initial(cfg.seed).model.eval()
    tuned = create_model(cfg.model.name, str(record.out / "export" / "finetune" / "model.safetensors")).eval()
    source = ShardBatchSource(shards, cfg.data.eval_split, cfg.data.image_size, 48, train=False, seed=seed)
    images = torch.cat([b["image"] for b in source.batches(0, 0, 1)])
    with torch.no_grad():
        target = start.encode_image(images)
    rows = {}
    for name, model in (("pretrained", start), ("finetune", tuned)):
        metrics = record.milestones[name]
        rows[name] = {
            "robust top-1": metrics[headline],
            "clean top-1": metrics["zero_shot/clean/top1"],
            "FARE distance under attack": fare_distance(model, images, target, seed),
            "2AFC robust accuracy": metrics[f"two_afc/apgd_linf:{EPS:g}/all/robust_accuracy"],
            "2AFC accuracy": metrics["two_afc/clean/all/accuracy"],
        }
    rows["finetune"]["retention"] = rows["finetune"]["clean top-1"] / max(rows["pretrained"]["clean top-1"], 1e-9)
    print(f"[seed {seed}] {time.perf_counter() - started:.0f} s  {rows}", flush=True)
    return rows


def report(per_seed: list[dict[str, dict[str, float]]], seeds: list[int]) -> bool:
    import numpy as np

    from robustfm.evals.metrics import mean_confidence_interval

    def cell(values: list[float]) -> str:
        if all(np.isnan(values)):
            return "n/a"
        mean, low, high = mean_confidence_interval(values)
        return f"{mean:.3f} [{low:.3f}, {high:.3f}]"

    columns = ["robust top-1", "FARE distance under attack", "2AFC robust accuracy", "2AFC accuracy", "clean top-1"]
    columns.append("retention")
    print(f"\nmean [95% t-CI] over seeds {seeds} (n={len(seeds)}), 48 held-out demo images, Linf {EPS * 255:g}/255\n")
    print("| model | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, label in (("pretrained", "starting model (random init)"), ("finetune", "after FARE")):
        values = [[s[name].get(col, float("nan")) for s in per_seed] for col in columns]
        print(f"| {label} | " + " | ".join(cell(v) for v in values) + " |")
    ok = True
    checks = [("robust top-1", 1, "gain"), ("FARE distance under attack", -1, "drop")]
    checks.append(("2AFC robust accuracy", 1, "gain"))
    for column, sign, what in checks:
        paired = [sign * (s["finetune"][column] - s["pretrained"][column]) for s in per_seed]
        mean, low, high = mean_confidence_interval(paired)
        passed = low > 0
        ok &= passed
        print(
            f"{'PASS' if passed else 'FAIL'}  paired {column} {what} {mean:.3f} [{low:.3f}, {high:.3f}]: CI lower > 0"
        )
    return ok


def main(argv: list[str] | None = None) -> int:
    return run_seeded_fidelity(
        __doc__, 12, "fine-tuning epochs (one epoch: ~5 steps of 16)", "fidelity_fare", run_seed, report, argv
    )


if __name__ == "__main__":
    sys.exit(main())
