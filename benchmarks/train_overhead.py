"""Step time of the training engine (Ray launcher, 1 worker) with ``ddp`` and ``deepspeed`` ZeRO-2 against a bare
PyTorch loop, same model, data, optimizer and clipping, measured in the same run.

    python benchmarks/train_overhead.py                  # MLP 256-1024-1024-64 (1.38 M parameters), batch 256
    python benchmarks/train_overhead.py --steps 100 --hidden 2048

Every side runs in a Ray worker process with 1 CPU (Ray sets ``OMP_NUM_THREADS=1`` there: one torch thread): the bare
loop as a plain Ray task, the engine as a 1-worker ``TorchTrainer``. Each is timed per 10-step window, data fetching
included, in wall time and in CPU time of the training thread (the loop's own cost, robust to a contended host); each
side reports its best window (noise only ever adds time). The bare loop runs before, between and after the engine
runs. Target: ddp <= 1.10x bare.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

from robustfm.config import load_config
from robustfm.train import TrainConfig, fit
from robustfm.train.synthetic import SyntheticBatchSource, TinyRegressionTask, build_tiny_task

WINDOW = 10


def bare_loop_ms(
    task_kwargs: dict, source: SyntheticBatchSource, steps: int, lr: float, seed: int
) -> tuple[float, float]:
    """Best 10-step windows of a plain loop: forward, backward, clip, AdamW step (wall and CPU ms per step)."""
    torch.manual_seed(seed)
    task = TinyRegressionTask(**task_kwargs)
    task.active_losses = frozenset({"mse"})
    optimizer = torch.optim.AdamW(task.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    walls, cpus, started, cpu_started = [], [], time.perf_counter(), time.thread_time()
    for step, batch in enumerate(source.batches(0, 0, 1, 0)):
        if step == steps:
            break
        loss = task(batch)["mse"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % WINDOW == 0:
            now, cpu_now = time.perf_counter(), time.thread_time()
            walls.append(1000.0 * (now - started) / WINDOW)
            cpus.append(1000.0 * (cpu_now - cpu_started) / WINDOW)
            started, cpu_started = now, cpu_now
    return min(walls[1:]), min(cpus[1:])  # the first window pays for warm-up


def engine_ms(
    strategy: str, task_kwargs: dict, source: SyntheticBatchSource, steps: int, lr: float, seed: int, storage: str
) -> tuple[float, float]:
    """Best 10-step windows of the engine's own step-time metrics, wall and CPU (Ray Train, 1 worker of 1 CPU)."""
    import functools

    cfg = load_config(
        TrainConfig,
        base={
            "launcher": "ray",
            "num_workers": 1,
            "resources_per_worker": {"CPU": 1},
            "storage_path": storage,
            "log_every_steps": WINDOW,
            "seed": seed,
            "grad_clip": 1.0,
            "keep_checkpoints": 1,
            "strategy": {"name": strategy, "zero_stage": 2},
            "stages": {
                "bench": {
                    "trainable": ["body", "head"],
                    "lr": {"body": lr, "head": lr},
                    "schedule": "constant",
                    "loss_weights": {"mse": 1.0},
                    "max_batches_per_epoch": steps,
                }
            },
        },
    )
    result = fit(cfg, functools.partial(build_tiny_task, **task_kwargs), source, run_name=f"overhead-{strategy}")
    records = result.history[1:]
    return min(r["step_time_ms"] for r in records), min(r["step_cpu_ms"] for r in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    args = parser.parse_args()
    import ray

    task_kwargs = {"in_dim": 256, "hidden": args.hidden, "out_dim": 64}
    params = sum(p.numel() for p in TinyRegressionTask(**task_kwargs).parameters())
    source = SyntheticBatchSource(
        num_samples=args.batch_size * args.steps, global_batch_size=args.batch_size, in_dim=256, out_dim=64
    )
    ray.init(
        num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False
    )
    bare_task = ray.remote(num_cpus=1)(bare_loop_ms)
    bare, engine = [], {}
    with tempfile.TemporaryDirectory() as storage:
        for strategy in ("ddp", "deepspeed"):
            bare.append(ray.get(bare_task.remote(task_kwargs, source, args.steps, 1e-3, 0)))
            engine[strategy] = engine_ms(strategy, task_kwargs, source, args.steps, 1e-3, 0, storage)
        bare.append(ray.get(bare_task.remote(task_kwargs, source, args.steps, 1e-3, 0)))
    ray.shutdown()
    reference = (min(b[0] for b in bare), min(b[1] for b in bare))
    print(
        f"model: MLP 256-{args.hidden}-{args.hidden}-64 ({params / 1e6:.2f} M parameters), batch {args.batch_size}, "
        f"AdamW, clip 1.0, fp32, 1 CPU per side; torch {torch.__version__}, ray {ray.__version__}, "
        f"{platform.processor() or platform.machine()}"
    )
    print(f"{'':28s} {'wall ms/step':>12s} {'vs bare':>8s} {'CPU ms/step':>12s} {'vs bare':>8s}")
    rows = {
        "bare PyTorch loop": reference,
        "engine ddp (Ray, 1 worker)": engine["ddp"],
        "engine deepspeed ZeRO-2": engine["deepspeed"],
    }
    for name, (wall, cpu) in rows.items():
        print(f"{name:28s} {wall:12.2f} {wall / reference[0]:7.2f}x {cpu:12.2f} {cpu / reference[1]:7.2f}x")
    for label, index in (("wall", 0), ("CPU", 1)):
        ratio = engine["ddp"][index] / reference[index]
        print(f"ddp {label} ratio {ratio:.3f}: {'meets' if ratio <= 1.10 else 'misses'} the target of <= 1.10x")


if __name__ == "__main__":
    main()
