"""Items ``attacks`` and ``fare_step``: paper 003's two speed goals, measured with the benchmarks' own code.

``attacks`` (``benchmarks/attacks.py``): our APGD against torchattacks 3.5.1's, ViT-B/32 zero-shot head, batch 256,
bf16 (ours: autocast with an fp32 perturbation; torchattacks as shipped, fp32, and wrapped in autocast), Linf 4/255,
10 and 100 iterations, 1 restart, no early stop, labels = the model's predictions (so torchattacks attacks every row).
Goal: >= 2.5x torchattacks at >= equal success (its measured 331 img/s). Without torchattacks installed (a
benchmark-only dependency: ``pip install --no-deps torchattacks==3.5.1``) ours is timed alone.

``fare_step`` (``benchmarks/fare_step.py``): a FARE step through the engine (local launcher, DDP runtime, bf16, the
FARE task with PGD 10 x 1/255 inside) against the bare model doing the same work, ViT-B/32 at 224 px, batch 128.
Goal: >= 0.9x.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from gpu_items.common import ItemReport, Profile

ATTACK_GOAL, STEP_GOAL = 2.5, 0.9


def attacks(profile: Profile, workdir: Path) -> ItemReport:
    import torch
    from attacks import OURS, build_classifier, compare

    try:
        import torchattacks
    except ImportError:
        torchattacks = None
    device = torch.device(profile.device)
    torch.manual_seed(0)
    classifier, classifier_bf16, size = build_classifier(profile.model, None, 10, device)
    batch = profile.pick(256, 8)
    images = torch.rand((batch, 3, size, size), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        labels = classifier(images).argmax(dim=1)
    args = argparse.Namespace(bf16=profile.gpu, rounds=profile.pick(2, 1))
    table, ratios = [], []
    for steps in profile.pick((10, 100), (2,)):
        seconds, outcomes = compare(steps, 4 / 255, args, classifier, classifier_bf16, images, labels, torchattacks)
        for side, (success, loss) in outcomes.items():
            table.append(
                {
                    "iterations": steps,
                    "side": side,
                    "img/s": round(batch / seconds[side], 1),
                    "time vs ours": round(seconds[side] / seconds[OURS], 2),
                    "success": round(success.float().mean().item(), 4),
                    "mean best CE": round(loss.float().mean().item(), 4),
                }
            )
        theirs = [r for r in table if r["iterations"] == steps and r["side"].endswith("(fp32)")]
        if theirs:
            ours = next(r for r in table if r["iterations"] == steps and r["side"] == OURS)
            ratios.append((theirs[0]["time vs ours"], ours["success"] >= theirs[0]["success"]))
    met = all(r >= ATTACK_GOAL and ok for r, ok in ratios) if ratios and profile.gpu else None
    return ItemReport(
        summary=f"APGD, {profile.model}, batch {batch}: "
        + (", ".join(f"{r:.2f}x torchattacks" for r, _ in ratios) if ratios else "torchattacks not installed"),
        metrics={"ratios": [r for r, _ in ratios]},
        goal=f">= {ATTACK_GOAL}x torchattacks at >= equal success (ViT-B/32, bf16, batch 256)",
        goal_met=met,
        tables={"APGD vs torchattacks": table},
    )


def fare_step(profile: Profile, workdir: Path) -> ItemReport:
    import torch
    from fare_step import ATTACK_STEPS, EPS, STEP, Batches, bare_ms, engine_ms

    from robustfm.attacks import AttackConfig
    from robustfm.config import ModelConfig
    from robustfm.methods.fare_config import FAREConfig
    from robustfm.recipes.kit import TaskBuilder

    if not profile.gpu:
        torch.set_num_threads(1)  # the dry run shares two cores with Ray: one thread is the honest CPU-time measure
    precision = profile.pick("bf16", "fp32")
    attack = AttackConfig(eps=EPS, steps=ATTACK_STEPS, step_size=STEP, objective="embedding_l2", precision=precision)
    builder = TaskBuilder("fare", ModelConfig(profile.model), FAREConfig(attack=attack))
    batch, steps = profile.pick(128, 4), 10
    images = torch.rand(batch * steps, 3, profile.image_size, profile.image_size)
    with torch.no_grad():
        teacher = builder.initial(0).model.eval()
        targets = torch.cat([teacher.encode_image(chunk).float() for chunk in images.split(64)])
    source = Batches(images, targets, batch)
    args = argparse.Namespace(device=profile.device, strategy="ddp", bf16=profile.gpu)
    rounds = []
    with tempfile.TemporaryDirectory(dir=workdir) as storage:
        for repeat in range(profile.pick(2, 1)):
            bare = bare_ms(builder, source, torch.device(profile.device), profile.gpu)
            engine = engine_ms(builder, source, args, storage, repeat)
            rounds.append((bare, engine))
    ratio = statistics.median(bare / engine for bare, engine in rounds)
    bare, engine = (statistics.median(r[i] for r in rounds) for i in (0, 1))
    return ItemReport(
        summary=f"FARE step, {profile.model}, batch {batch}, {precision}: engine {ratio:.3f}x the bare model",
        metrics={"ratio": ratio, "bare_ms": bare, "engine_ms": engine, "img_per_s": 1000 * batch / engine},
        goal=f">= {STEP_GOAL}x the bare model (10 PGD steps + 1 train step)",
        goal_met=(ratio >= STEP_GOAL) if profile.gpu else None,
        tables={
            "FARE step": [
                {"side": "bare model", "ms/step": round(bare, 1), "img/s": round(1000 * batch / bare, 1)},
                {"side": "engine + FARE task", "ms/step": round(engine, 1), "img/s": round(1000 * batch / engine, 1)},
            ]
        },
    )
