"""Fidelity of the CG-CLIP recipe: does Adapt-Isolate-Tune learn what paper 000 says it learns, and do its ablations
rank as in its tables 1-2? Trained and measured on the embedded demo data over several seeds, with 95% CIs.

    python benchmarks/fidelity_cgclip.py                 # 3 seeds, FULL budget: ~80 min on 2 busy CPU cores
    python benchmarks/fidelity_cgclip.py --variants cgclip flyp_only no_tune no_isolate   # without joint: ~42 min
    python benchmarks/fidelity_cgclip.py --quick         # 3 seeds, half the budget: ~30 min
    python benchmarks/fidelity_cgclip.py --seeds 0 1 2 3 4

Stages already saved under ``--output-dir`` are reused (the recipe skips a finished stage on a rerun); stages trained
with another budget, decoder or data size are discarded first (``settings.json`` in the folder records them).

What it trains, per seed, in one output folder so shared curriculum prefixes train once (robustfm/recipes/cgclip.py):
CG-CLIP (adapt > isolate > tune) and the presets of configs/cgclip/ablations/: flyp_only (adapt), no_tune
(adapt > isolate), no_isolate (adapt > tune) and joint (one stage, all losses). The model is the tiny registered
CLIP ``open_clip/tiny-vit`` (4 blocks, width 64, 64 px) from RANDOM initialisation: no pretrained CLIP weights exist
offline, so "pretrained" below means random init and every number is about this toy, not about ViT-B/32.

Budget (optimizer steps; one step = one batch of 8 clean + 8 corrupted images): Adapt ``A`` epochs, Isolate ``I``,
Tune ``T``. CG-CLIP takes A+I+T epochs; ``joint`` gets A+I+T epochs of its single stage and ``no_isolate`` gets
Tune for I+T epochs, so these three spend the same number of steps. ``flyp_only`` (A) and ``no_tune`` (A+I) are
prefixes of CG-CLIP's curriculum and share its trained stages, as in the paper, so they get fewer steps by
construction: giving them more would mean training other weights than the ones CG-CLIP continues from.
Learning rates are constant and far above the paper's (see :class:`Budget`): the paper fine-tunes a pretrained CLIP,
here every tower starts from random weights. Weight decay stays at configs/cgclip/vit_b32.yaml's (0.2 encoders,
0.05 decoder). The decoder's channels are scaled to the tiny model (``TINY_DECODER``). The seed sets the training
(init, data order, corruptions) and the evaluation draws (severities, probe split), so the CIs cover both.

Measured on held-out images (the demo set's ``val`` split, never trained on):
- detection AUROC, seen and unseen corruptions, zero-shot prompts and linear probe (the ``corruption_detection``
  suite at the final milestone of each variant);
- the decoder's pixel AUROC: sigmoid(decoder logits) of corrupted images against their ground-truth map (VGG-16
  feature L1 with HED's real VGG-16 convolutions, the fitted default scale) binarized at > 0.5;
- the silhouette score (cosine) of clean vs corrupted image embeddings (each held-out image clean and under one
  seen corruption drawn per image).

Checks (exit status 1 on a FAIL): CG-CLIP's seen-corruption AUROC (zero-shot) has its CI's lower bound above 0.5;
the GT maps have pixels above the threshold; its decoder's pixel AUROC, pooled and within images, too;
``no_tune``'s image embeddings equal ``flyp_only``'s (Isolate freezes the encoders); and the paired difference
CG-CLIP minus FLYP-only (seen and unseen, zero-shot and probe; the paper's tables 1-2 ordering) does not lie below 0.
Detection metrics are the suite's: balanced clean-vs-corrupted sets, the method's own prompts, the probe fitted on
the training split and applied to the held-out images.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fidelity_common import REPO, machine_line, start_ray

DEMO_CONFIG = REPO / "configs" / "cgclip" / "demo.yaml"
PRESETS = REPO / "configs" / "cgclip" / "ablations"
VARIANTS = ("cgclip", "flyp_only", "no_tune", "no_isolate", "joint")
REQUIRED = ("cgclip", "flyp_only", "no_tune")  # the checks and the paper's ordering need these
# Cheap corruptions of each set (glass_blur, zoom_blur and the like cost far more per image).
SEEN_EVAL = ("gaussian_noise", "motion_blur", "pixelate", "brightness")
UNSEEN_EVAL = ("shot_noise", "defocus_blur", "saturate")
MAP_THRESHOLD = 0.5
DETECTION = {
    "seen AUROC zero-shot": "corruption_detection/zero_shot/set/seen/auroc",
    "unseen AUROC zero-shot": "corruption_detection/zero_shot/set/unseen/auroc",
    "seen AUROC probe": "corruption_detection/probe/set/seen/auroc",
    "unseen AUROC probe": "corruption_detection/probe/set/unseen/auroc",
}
COLUMNS = (*DETECTION, "pixel AUROC", "pixel AUROC within image", "silhouette")


@dataclass(frozen=True)
class Budget:
    """Epochs per stage; see the module docstring for how the variants' step counts compare."""

    adapt: int
    isolate: int
    tune: int
    image_lr: float = 1e-3
    """Random-init tiny CLIP learns nothing at the paper's 1e-6 in a few hundred steps."""
    text_lr: float = 1e-5
    """Kept low: at 1e-3 the random-init text tower maps both prompts to one point (cosine 0.996 after 160 steps),
    the image embeddings follow, and the contrastive loss sits at chance (ln 16). A slow text tower keeps the two
    prompts apart, as a pretrained one would, and lets the image tower learn to place images between them."""
    decoder_lr: float = 3e-3
    """Measured with the decoder alone on Adapt's frozen encoder (seed 0), trained on train-split batches and scored
    on the held-out images (pooled pixel AUROC): 3e-3 gives 0.55-0.63 after 36 steps, 0.63-0.65 after 72, 0.71 after
    144 and 0.75 after 300; 3e-2 collapses to an input-independent map (across-image spread of the mean prediction
    ~1e-4, AUROC ~0.5), which is what an earlier budget (3e-2, 36-72 Isolate steps) measured."""

    @property
    def total(self) -> int:
        return self.adapt + self.isolate + self.tune


# One epoch is 12 steps (96 train images, 8 clean per batch): Isolate gets 144 steps (FULL) or 72 (QUICK), enough for
# the decoder to rise clearly above chance at decoder_lr (see above).
FULL = Budget(adapt=24, isolate=12, tune=6)
QUICK = Budget(adapt=12, isolate=6, tune=3)
# The paper's decoder [384, 192, 96] is 6% of ViT-B/32's parameters but 123% of tiny-vit's (and 20x its step time
# on CPU); channels scaled to the tiny model keep the paper's proportion (about 6%).
TINY_DECODER = "[72,36,18]"


def base_overrides(out: Path, shards: str, vgg: Path, budget: Budget, seed: int) -> list[str]:
    img, txt, dec = budget.image_lr, budget.text_lr, budget.decoder_lr
    both = f"{{image_encoder: {img}, text_encoder: {txt}}}"
    everything = f"{{image_encoder: {img}, text_encoder: {txt}, decoder: {dec}}}"
    values = {
        "name": f"seed{seed}",
        "seed": str(seed),
        "output_dir": str(out / "runs"),
        "tracking.backend": "none",
        "data.shards": shards,
        "method.decoder_channels": TINY_DECODER,
        "data.image_size": "64",
        "data.global_batch_size": "16",
        "data.gt_map.weights": str(vgg),
        "data.gt_map.scale": "null",
        "train.storage_path": str(out / "checkpoints"),
        "train.log_every_steps": "20",
        "train.stages.adapt.schedule": "constant",
        "train.stages.adapt.epochs": str(budget.adapt),
        "train.stages.adapt.lr": both,
        "train.stages.isolate.schedule": "constant",
        "train.stages.isolate.epochs": str(budget.isolate),
        "train.stages.isolate.lr": f"{{decoder: {dec}}}",
        "train.stages.tune.schedule": "constant",
        "train.stages.tune.epochs": str(budget.tune),
        "train.stages.tune.lr": everything,
        "train.stages.joint.schedule": "constant",
        "train.stages.joint.epochs": str(budget.total),
        "train.stages.joint.lr": everything,
        "eval.suites": "[corruption_detection]",
        "eval.tsne": "false",
        "eval.settings.seed": str(seed),
        "eval.settings.suites.corruption_detection.data.max_samples": "null",
        "eval.settings.suites.corruption_detection.corruptions": f"[{','.join(SEEN_EVAL + UNSEEN_EVAL)}]",
        "export.wise_ft_alphas": "[]",
    }
    return [f"{k}={v}" for k, v in values.items()]


def variant_configs(base: Any, budget: Budget, chosen: tuple[str, ...] = VARIANTS) -> dict[str, Any]:
    """The recipe's presets on ``base``; ``no_isolate``'s Tune absorbs Isolate's epochs (same total steps)."""
    from robustfm.recipes.cgclip_ablations import load_variants

    variants = load_variants(base, PRESETS, [v for v in VARIANTS if v != "cgclip"])
    stages = dict(base.train.stages)
    stages["tune"] = dataclasses.replace(stages["tune"], epochs=budget.isolate + budget.tune)
    no_isolate = variants["no_isolate"]
    variants["no_isolate"] = dataclasses.replace(no_isolate, train=dataclasses.replace(no_isolate.train, stages=stages))
    return {name: variants[name] for name in chosen}


def heldout_batch(cfg: Any, shards: str) -> dict[str, Any]:
    """Every held-out image, clean, corrupted with a seen corruption (per-image draw) and its ground-truth map."""
    from robustfm.recipes.cgclip import first_evaluation_batch

    data = dataclasses.replace(cfg.data, shards=shards)
    return first_evaluation_batch(data, cfg.data.eval_split, cfg.seed + 7919, seed=cfg.seed, with_maps=True)


def load_task(cfg: Any, weights: Path) -> Any:
    from robustfm.recipes.kit import TaskBuilder

    return TaskBuilder("cgclip", cfg.model, cfg.method, str(weights))().eval()


def embeddings(task: Any, images: Any) -> np.ndarray:
    import torch

    with torch.no_grad():
        return task.model.encode_image(images, normalize=True).double().numpy()


def pixel_aurocs(task: Any, batch: dict[str, Any]) -> tuple[float, float]:
    """Per-pixel AUROC of the predicted maps of the corrupted held-out images against their binarized GT maps:
    pooled over all pixels of all images (ranks images by how corrupted they are as well as pixels within one), and
    the mean over images of the AUROC within each image (localisation only; images whose binarized map is all one
    class are left out)."""
    import torch
    from sklearn.metrics import roc_auc_score

    with torch.no_grad():
        predicted = task.model.predict_map(batch["corrupted"]).flatten(1).numpy()
    target = (batch["map"].flatten(1).numpy() > MAP_THRESHOLD).astype(np.int64)
    if not target.any():  # no GT pixel above the threshold: nothing to localise (reported as a FAIL, not a crash)
        return float("nan"), float("nan")
    pooled = float(roc_auc_score(target.ravel(), predicted.ravel()))
    mixed = [i for i in range(len(target)) if 0 < target[i].mean() < 1]
    within = float(np.mean([roc_auc_score(target[i], predicted[i]) for i in mixed])) if mixed else float("nan")
    return pooled, within


def silhouette(task: Any, batch: dict[str, Any]) -> float:
    from sklearn.metrics import silhouette_score

    clean, corrupted = embeddings(task, batch["image"]), embeddings(task, batch["corrupted"])
    labels = np.r_[np.zeros(len(clean)), np.ones(len(corrupted))]
    return float(silhouette_score(np.concatenate([clean, corrupted]), labels, metric="cosine"))


def run_seed(seed: int, args: argparse.Namespace, shards: str, vgg: Path, budget: Budget) -> dict[str, dict]:
    """Train and measure every variant for one seed; returns ``{row: {column: value}}`` and the embedding check."""
    from robustfm.config import load_config
    from robustfm.recipes.cgclip import run
    from robustfm.recipes.cgclip_config import CGClipRecipeConfig

    base = load_config(CGClipRecipeConfig, DEMO_CONFIG, base_overrides(args.output_dir, shards, vgg, budget, seed))
    variants = variant_configs(base, budget, tuple(args.variants))
    batch = heldout_batch(base, shards)
    positives = float((batch["map"] > MAP_THRESHOLD).float().mean())
    stages_dir = Path(base.output_dir).resolve() / base.name / "stages"
    rows: dict[str, dict] = {}
    for name, cfg in variants.items():
        started = time.perf_counter()
        result = run(cfg)
        milestone = "-".join(cfg.curriculum)
        task = load_task(cfg, stages_dir / milestone / "task.safetensors")
        row = {col: result.milestones[milestone].get(key, float("nan")) for col, key in DETECTION.items()}
        trains_decoder = any(cfg.train.stages[s].loss_weights.get("corruption", 0) > 0 for s in cfg.curriculum)
        pooled, within = pixel_aurocs(task, batch) if trains_decoder else (float("nan"), float("nan"))
        row["pixel AUROC"], row["pixel AUROC within image"] = pooled, within
        row["silhouette"] = silhouette(task, batch)
        rows[name] = row
        if "pretrained" not in rows:
            pretrained = initial_task(cfg)
            rows["pretrained"] = {
                **{col: result.milestones["pretrained"].get(key, float("nan")) for col, key in DETECTION.items()},
                "pixel AUROC": float("nan"),
                "pixel AUROC within image": float("nan"),
                "silhouette": silhouette(pretrained, batch),
            }
        print(f"[seed {seed}] {name}: {time.perf_counter() - started:.0f} s  " + _fmt_row(row), flush=True)
    flyp = load_task(base, stages_dir / "adapt" / "task.safetensors")
    no_tune = load_task(base, stages_dir / "adapt-isolate" / "task.safetensors")
    images = np.concatenate([batch["image"].numpy(), batch["corrupted"].numpy()])
    import torch

    pixels = torch.from_numpy(images)
    diff = float(np.abs(embeddings(flyp, pixels) - embeddings(no_tune, pixels)).max())
    return {"rows": rows, "embedding_diff": diff, "gt_positive_fraction": positives}


def initial_task(cfg: Any) -> Any:
    """The random-init model the recipe's training starts from (the engine seeds torch with the run seed)."""
    from robustfm.recipes.kit import TaskBuilder

    return TaskBuilder("cgclip", cfg.model, cfg.method).initial(cfg.seed).eval()


def _fmt_row(row: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.3f}" for k, v in row.items())


def print_table(
    per_seed: list[dict], seeds: list[int], variants: list[str]
) -> dict[str, dict[str, tuple[float, float, float]]]:
    from robustfm.evals.metrics import mean_confidence_interval

    order = ("pretrained", *variants)
    labels = {
        "pretrained": "random init (CLIP + probe baseline)",
        "cgclip": "CG-CLIP adapt>isolate>tune",
        "flyp_only": "flyp_only adapt",
        "no_tune": "no_tune adapt>isolate",
        "no_isolate": "no_isolate adapt>tune",
        "joint": "joint (one stage)",
    }
    summary: dict[str, dict[str, tuple[float, float, float]]] = {}
    print(f"\nmean [95% t-CI] over seeds {seeds} (n={len(seeds)})\n")
    print("| variant | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for name in order:
        cells, summary[name] = [], {}
        for col in COLUMNS:
            values = [s["rows"][name][col] for s in per_seed]
            if all(np.isnan(values)):
                cells.append("n/a")
                continue
            summary[name][col] = mean_confidence_interval(values)
            m, lo, hi = summary[name][col]
            cells.append(f"{m:.3f} [{lo:.3f}, {hi:.3f}]")
        print(f"| {labels[name]} | " + " | ".join(cells) + " |")
    return summary


def checks(summary: dict, per_seed: list[dict]) -> bool:
    from robustfm.evals.metrics import mean_confidence_interval

    ok = True

    def report(passed: bool, text: str) -> None:
        nonlocal ok
        ok &= passed
        print(f"{'PASS' if passed else 'FAIL'}  {text}")

    def bound(row: str, col: str) -> float:
        return summary.get(row, {}).get(col, (float("nan"),) * 3)[1]

    print()
    lo = bound("cgclip", "seen AUROC zero-shot")
    report(lo > 0.5, f"CG-CLIP seen-corruption AUROC (zero-shot) CI lower bound {lo:.3f} > 0.5")
    positives = min(s["gt_positive_fraction"] for s in per_seed)
    report(positives > 0, f"every seed's GT maps have pixels above {MAP_THRESHOLD} (smallest share {positives:.4f})")
    lo = bound("cgclip", "pixel AUROC")
    report(lo > 0.5, f"CG-CLIP decoder pixel AUROC CI lower bound {lo:.3f} > 0.5")
    lo = bound("cgclip", "pixel AUROC within image")
    report(lo > 0.5, f"CG-CLIP decoder localisation within images (pixel AUROC) CI lower bound {lo:.3f} > 0.5")
    worst = max(s["embedding_diff"] for s in per_seed)
    report(worst < 1e-6, f"no_tune image embeddings == flyp_only's: max |diff| over seeds {worst:.2e} < 1e-6")
    print("\nPaper ordering (tables 1-2: CG-CLIP > FLYP-only), paired over seeds (the same seed trains both):")
    for col in ("seen AUROC zero-shot", "unseen AUROC zero-shot", "seen AUROC probe", "unseen AUROC probe"):
        diffs = [s["rows"]["cgclip"][col] - s["rows"]["flyp_only"][col] for s in per_seed]
        mean, low, high = mean_confidence_interval(diffs)
        verdict = "FAIL (below 0)" if high < 0 else "CG-CLIP ahead" if low > 0 else "interval includes 0"
        if high < 0:
            ok = False
        print(f"  {col}: CG-CLIP - FLYP-only = {mean:+.3f} [{low:+.3f}, {high:+.3f}] -> {verdict}")
    return ok


def discard_stale_stages(output_dir: Path, budget: Budget, args: argparse.Namespace) -> None:
    """Trained stages are reused on a rerun only if they were trained with the same settings: a stage saved under
    another budget, decoder size or data size is deleted (with a message) instead of being silently reported."""
    import json
    import shutil

    settings = {
        "budget": dataclasses.asdict(budget),
        "decoder": TINY_DECODER,
        "n_train": args.n_train,
        "n_val": args.n_val,
    }
    record = output_dir / "settings.json"
    if record.is_file() and json.loads(record.read_text()) != settings:
        print(f"settings changed since the stages under {output_dir} were trained: retraining from scratch", flush=True)
        for stale in ("runs", "checkpoints", "demo_data"):
            shutil.rmtree(output_dir / stale, ignore_errors=True)
    record.write_text(json.dumps(settings, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (>= 3 for a CI)")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=VARIANTS,
        help=f"variants to train and report (always with {', '.join(REQUIRED)})",
    )
    parser.add_argument("--quick", action="store_true", help=f"budget {QUICK} instead of {FULL}")
    parser.add_argument("--output-dir", type=Path, default=REPO / "outputs" / "fidelity_cgclip")
    parser.add_argument("--n-train", type=int, default=96, help="demo training images")
    parser.add_argument("--n-val", type=int, default=48, help="demo held-out images (all evaluations)")
    args = parser.parse_args(argv)
    args.variants = [v for v in VARIANTS if v in set(args.variants) | set(REQUIRED)]
    args.output_dir = args.output_dir.resolve() / ("quick" if args.quick else "full")
    budget = QUICK if args.quick else FULL
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from safetensors.torch import save_file

    from robustfm.data.demo import write_demo_shards
    from robustfm.gtmaps.hed import load_hed_vgg16_state_dict

    started = time.perf_counter()
    start_ray()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    discard_stale_stages(args.output_dir, budget, args)
    vgg = args.output_dir / "hed_vgg16_features.safetensors"
    if not vgg.is_file():
        save_file({k: v.contiguous() for k, v in load_hed_vgg16_state_dict().items()}, str(vgg))
    shards = str(
        write_demo_shards(args.output_dir / "demo_data", image_size=64, n_images=args.n_train, n_val=args.n_val)
    )
    per_seed = []
    for seed in args.seeds:
        per_seed.append(run_seed(seed, args, shards, vgg, budget))
    print(
        f"\nCG-CLIP fidelity on the demo data: open_clip/tiny-vit from random init, 64 px, {args.n_train} train / "
        f"{args.n_val} held-out images; budget {budget}"
    )
    print(
        f"eval corruptions: seen {list(SEEN_EVAL)}, unseen {list(UNSEEN_EVAL)}; GT map positive pixels (> "
        f"{MAP_THRESHOLD}) on held-out corrupted images: "
        + ", ".join(f"{s['gt_positive_fraction']:.3f}" for s in per_seed)
    )
    summary = print_table(per_seed, args.seeds, args.variants)
    ok = checks(summary, per_seed)
    print(machine_line(started))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
