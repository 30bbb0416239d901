"""A FARE training step through the engine against its limit, the bare model doing the same work, in the same run.

    python benchmarks/fare_step.py                      # CPU: open_clip/tiny-vit at 64 px, batch 16, 1 torch thread
    python benchmarks/fare_step.py --device cuda --model open_clip/ViT-B-32 --image-size 224 --batch 128 --bf16

The limit (``bare``): a plain PyTorch loop doing what a FARE step must do and nothing else, on the bare open_clip
model: 10 PGD steps (model in eval mode, forward, gradient w.r.t. the input only, sign step of 1/255, projection to
the eps-ball and [0,1]) and one training step (model in train mode, forward at the adversarial points, squared L2 to
the given targets f0(x), backward, AdamW step). The engine (``engine``): ``robustfm.train.fit`` with the local
launcher (one process, no Ray, DDP runtime or ``--strategy deepspeed`` ZeRO-2), the FARE task of
``robustfm.methods.fare`` (``robustfm.attacks.pgd`` inside its forward with momentum, per-image seeded starts,
failed/zero-gradient bookkeeping, and the clean term computed for the report), batches moved to the device by the
engine, the same optimizer, no clipping (RobustVLM clips nothing).

Timing: the engine's own per-window step times (``log_every_steps`` = 5, the first window dropped as warm-up) and
the bare loop's 5-step windows measured the same way: wall time on CUDA (synchronized), CPU time of the training
thread on CPU (robust to a contended host). The sides alternate over ``--repeats`` rounds; each side's best window
per round counts, and the MEDIAN over rounds of engine speed / bare speed decides: goal >= 0.9x.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from robustfm.attacks import AttackConfig  # noqa: E402
from robustfm.config import ModelConfig, load_config  # noqa: E402
from robustfm.methods.fare_config import FAREConfig  # noqa: E402
from robustfm.recipes.kit import TaskBuilder  # noqa: E402
from robustfm.seeding import sample_seed  # noqa: E402
from robustfm.train import TrainConfig, fit  # noqa: E402

WINDOW = 5
GOAL = 0.9
EPS, STEP, ATTACK_STEPS, LR = 4 / 255, 1 / 255, 10, 1e-5


class Batches:
    """``steps`` batches of fixed images with their f0 targets and per-(id, epoch) attack seeds, on the CPU."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, batch: int) -> None:
        self.images, self.targets, self.batch = images, targets, batch

    def num_batches(self, epoch: int, rank: int, world_size: int) -> int:
        return len(self.images) // self.batch

    def batches(self, epoch: int, rank: int, world_size: int, skip_batches: int = 0):
        for index in range(skip_batches, self.num_batches(epoch, rank, world_size)):
            rows = slice(index * self.batch, (index + 1) * self.batch)
            seeds = torch.tensor(
                [sample_seed(str(i), epoch, "adversarial_start", 0) for i in range(*rows.indices(9**9))]
            )
            yield {"image": self.images[rows], "target": self.targets[rows], "attack_seed": seeds}


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.thread_time()


def bare_ms(builder: TaskBuilder, source: Batches, device: torch.device, bf16: bool) -> float:
    """Best 5-step window of the bare loop, ms per step."""
    model = builder.initial(0).model.to(device)
    trainable = model.image_parameters()
    for parameter in model.text_parameters():
        parameter.requires_grad_(False)
    optimizer = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    windows, started = [], _clock(device)
    for step, batch in enumerate(source.batches(0, 0, 1)):
        x, target = batch["image"].to(device), batch["target"].to(device)
        model.eval()
        delta = (torch.rand_like(x) * 2 - 1) * EPS
        for _ in range(ATTACK_STEPS):
            delta.requires_grad_(True)
            with autocast:
                embedding = model.encode_image((x + delta).clamp(0, 1))
            loss = (embedding.float() - target).pow(2).sum()
            (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + STEP * grad.sign()).clamp(-EPS, EPS)
            delta = (x + delta).clamp(0, 1) - x
        model.train()
        with autocast:
            embedding = model.encode_image(x + delta)
        (embedding.float() - target).pow(2).sum(1).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % WINDOW == 0:
            now = _clock(device)
            windows.append(1000.0 * (now - started) / WINDOW)
            started = now
    return min(windows[1:])


def engine_ms(builder: TaskBuilder, source: Batches, args: argparse.Namespace, storage: str, run: int) -> float:
    """Best 5-step window of the engine's own step times (wall on CUDA, CPU time of the loop's thread on CPU)."""
    cfg = load_config(
        TrainConfig,
        base={
            "launcher": "local",
            "use_gpu": args.device == "cuda",
            "storage_path": storage,
            "log_every_steps": WINDOW,
            "grad_clip": 0,
            "keep_checkpoints": 1,
            "optimizer": {"name": "adamw", "betas": [0.9, 0.999], "eps": 1e-8, "no_decay_1d": False},
            "strategy": {"name": args.strategy, "zero_stage": 2, "precision": "bf16" if args.bf16 else "fp32"},
            "stages": {
                "bench": {
                    "trainable": ["image_encoder"],
                    "lr": {"image_encoder": LR},
                    "weight_decay": {"image_encoder": 1e-4},
                    "schedule": "constant",
                    "loss_weights": {"fare": 1.0},
                }
            },
        },
    )
    result = fit(cfg, builder, source, run_name=f"fare-step-{run}")
    key = "step_time_ms" if args.device == "cuda" else "step_cpu_ms"
    return min(r[key] for r in result.history[1:] if key in r)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="open_clip/tiny-vit")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=15, help="training steps per side and round (>= 2 windows)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--strategy", default="ddp", choices=("ddp", "deepspeed"))
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the model (fp32 perturbation)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    args = parser.parse_args()
    if args.steps < 2 * WINDOW:
        parser.error(f"--steps must be >= {2 * WINDOW} (the first window is warm-up)")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = "bf16" if args.bf16 else "fp32"
    attack = AttackConfig(eps=EPS, steps=ATTACK_STEPS, step_size=STEP, objective="embedding_l2", precision=precision)
    builder = TaskBuilder("fare", ModelConfig(args.model), FAREConfig(attack=attack))
    teacher = builder.initial(0).model.eval()
    images = torch.rand(args.batch * args.steps, 3, args.image_size, args.image_size)
    with torch.no_grad():
        targets = torch.cat([teacher.encode_image(chunk).float() for chunk in images.split(64)])
    source = Batches(images, targets, args.batch)
    ratios, rows = [], []
    with tempfile.TemporaryDirectory() as storage:
        for repeat in range(args.repeats):
            sides = ("bare", "engine") if repeat % 2 == 0 else ("engine", "bare")
            measured = {}
            for side in sides:
                if side == "bare":
                    measured[side] = bare_ms(builder, source, device, args.bf16)
                else:
                    measured[side] = engine_ms(builder, source, args, storage, repeat)
            ratios.append(measured["bare"] / measured["engine"])
            rows.append(measured)
            print(f"round {repeat}: bare {measured['bare']:.1f} ms/step, engine {measured['engine']:.1f} ms/step, "
                  f"engine speed / bare {ratios[-1]:.3f}", flush=True)  # fmt: skip
    clock = "wall" if device.type == "cuda" else "CPU time of the training thread"
    bare = statistics.median(r["bare"] for r in rows)
    engine = statistics.median(r["engine"] for r in rows)
    setup = f"{args.model} at {args.image_size} px, batch {args.batch}, {precision}, {args.device}, {args.strategy}"
    print(f"\nFARE step: {setup}, {ATTACK_STEPS} PGD steps + 1 train step; {clock}, median of {args.repeats} rounds\n")
    print("| side | ms/step | img/s | speed vs bare |\n|---|---|---|---|")
    print(f"| bare model (the limit) | {bare:.1f} | {1000 * args.batch / bare:.1f} | 1.000 |")
    print(f"| engine + FARE task | {engine:.1f} | {1000 * args.batch / engine:.1f} | {statistics.median(ratios):.3f} |")
    ok = statistics.median(ratios) >= GOAL
    print(f"\n{'PASS' if ok else 'FAIL'}  median engine speed / bare {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}); goal >= {GOAL}")  # fmt: skip
    print(f"{platform.node()}: {os.cpu_count()} CPUs, load average {os.getloadavg()}, torch {torch.__version__}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
