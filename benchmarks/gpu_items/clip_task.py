"""The workload of the engine items: a CLIP contrastive step (image and text towers, symmetric InfoNCE) as an engine
task, a deterministic synthetic batch source, and the bare PyTorch loop that the engine is compared with.

Both sides share everything but the loop: the same task module, the same batches (uint8 images and token ids copied
to the device each step, from pinned memory on CUDA), the engine's own optimizer builder (AdamW, fused on CUDA), the
same gradient clipping and bf16 autocast.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from robustfm.methods.losses import clip_contrastive_loss
from robustfm.train.task import StageSpec, move_batch, refuse_stage_settings

CONTEXT_LENGTH = 77
EOT_TOKEN = 49407  # open_clip pools the text tower at the largest token id: the end-of-text token
MAX_LOG_LOGIT_SCALE = math.log(100.0)  # CLIP's bound on 1/tau, applied after every step as open_clip does
POOL = 4  # distinct batches held in memory and cycled


class ContrastiveClipTask(nn.Module):
    """CLIP's contrastive loss over a batch of (image, caption tokens) pairs; groups ``image`` and ``text``.

    Images arrive as uint8 ``(N, 3, S, S)`` and become [0, 1] floats on the device (a quarter of the bytes to copy).
    """

    loss_names = ("contrastive",)
    needs: frozenset[str] = frozenset()

    def __init__(self, model_name: str) -> None:
        super().__init__()
        from robustfm.models import create_model

        self.model = create_model(model_name)

    def configure_stage(self, stage: StageSpec) -> None:
        refuse_stage_settings(stage, type(self).__name__)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        pixels = batch["image"].float().div_(255.0)
        images = self.model.encode_image(pixels)
        texts = self.model.clip.encode_text(batch["tokens"])
        return {"contrastive": clip_contrastive_loss(images, texts, self.model.logit_scale.exp())}

    def after_optimizer_step(self) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(max=MAX_LOG_LOGIT_SCALE)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"image": self.model.image_parameters(), "text": self.model.text_parameters()}


def build_clip_task(model_name: str, deterministic: bool = False, pid_log: str | None = None) -> ContrastiveClipTask:
    """The task (picklable through ``functools.partial``). ``deterministic`` switches this process to PyTorch's
    deterministic kernels where they exist (a warning, not an error, where they do not): the resume check.
    ``pid_log``: a file that gets this process's id on every call (which processes built the task: a restarted
    worker shows up as a new one)."""
    if pid_log is not None:
        with open(pid_log, "a") as log:
            log.write(f"{os.getpid()}\n")
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    return ContrastiveClipTask(model_name)


def clip_task_factory(model_name: str, deterministic: bool = False, pid_log: str | None = None) -> Any:
    return functools.partial(build_clip_task, model_name, deterministic, pid_log)


class SyntheticClipSource:
    """``POOL`` fixed random batches of uint8 images and token ids, cycled; batch ``i`` of epoch ``e`` is the same in
    every process and every attempt (a resumed run sees what an uninterrupted one saw).

    Args:
        global_batch: pairs per optimizer step over all ranks. steps: batches per epoch. image_size: side.
        seed: the data's seed.
    """

    def __init__(self, global_batch: int, steps: int, image_size: int, seed: int = 0) -> None:
        self.global_batch, self.steps, self.image_size, self.seed = global_batch, steps, image_size, seed
        self._pool: list[dict[str, torch.Tensor]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pool": None}  # regenerated where the source is used

    def _batches(self) -> list[dict[str, torch.Tensor]]:
        if self._pool is None:
            pool = []
            for k in range(POOL):
                generator = torch.Generator().manual_seed(self.seed * 1000 + k)
                size = (self.global_batch, 3, self.image_size, self.image_size)
                images = torch.randint(0, 256, size, generator=generator, dtype=torch.uint8)
                tokens = torch.randint(1, EOT_TOKEN, (self.global_batch, CONTEXT_LENGTH), generator=generator)
                tokens[:, -1] = EOT_TOKEN
                batch = {"image": images, "tokens": tokens}
                if torch.cuda.is_available():  # pinned: the copy to the device runs asynchronously
                    batch = {key: value.pin_memory() for key, value in batch.items()}
                pool.append(batch)
            self._pool = pool
        return self._pool

    def num_batches(self, epoch: int, rank: int, world_size: int) -> int:
        return self.steps

    def batches(self, epoch: int, rank: int, world_size: int, skip_batches: int = 0) -> Iterator[dict[str, Any]]:
        if self.global_batch % world_size:
            raise ValueError(f"global batch {self.global_batch} does not split over {world_size} ranks")
        per_rank = self.global_batch // world_size
        pool = self._batches()
        for index in range(skip_batches, self.steps):
            batch = pool[(epoch * self.steps + index) % POOL]
            yield {key: value[rank * per_rank : (rank + 1) * per_rank] for key, value in batch.items()}


def stage_config(steps: int, lr: float = 1e-5, warmup_steps: int = 0, schedule: str = "constant") -> dict[str, Any]:
    """One stage training both towers for ``steps`` steps on the contrastive loss (plain data for ``load_config``)."""
    return {
        "trainable": ["image", "text"],
        "lr": {"image": lr, "text": lr},
        "schedule": schedule,
        "warmup_steps": warmup_steps,
        "loss_weights": {"contrastive": 1.0},
        "max_batches_per_epoch": steps,
    }


def bare_windows(
    model_name: str,
    source: SyntheticClipSource,
    device: str,
    window: int,
    *,
    compile_backend: str | None = None,
    count_flops: bool = False,
) -> dict[str, Any]:
    """A plain PyTorch loop over ``source``: forward under bf16 autocast, backward, clip to 1.0, AdamW step, clamp.

    Returns:
        ``samples_per_s`` of each ``window``-step window (the first one, warm-up and compilation, is left out),
        ``first_window_s`` and, with ``count_flops`` (eager only), ``flops_per_sample`` of one training step
        (forward and backward, as ``torch.utils.flop_counter`` counts them on the first step).
    """
    from robustfm.config import load_config
    from robustfm.train import OptimizerConfig, StageConfig
    from robustfm.train.strategies import build_optimizer

    torch.manual_seed(0)
    task = build_clip_task(model_name).to(device)
    stage = load_config(StageConfig, base=stage_config(source.steps))
    task.configure_stage(StageSpec("bench", stage))
    optimizer, _, _ = build_optimizer(OptimizerConfig(), task.param_groups(), stage, torch.device(device))
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    forward = torch.compile(task, backend=compile_backend) if compile_backend else task
    flops_per_sample = None
    rates, started, first_window_s = [], time.perf_counter(), None
    for step, batch in enumerate(source.batches(0, 0, 1, 0)):
        batch = move_batch(batch, torch.device(device))
        counter = None
        if count_flops and step == 0 and not compile_backend:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            counter.__enter__()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = forward(batch)["contrastive"]
        loss.float().backward()
        if counter is not None:
            counter.__exit__(None, None, None)
            flops_per_sample = counter.get_total_flops() / source.global_batch
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        task.after_optimizer_step()
        if (step + 1) % window == 0:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            now = time.perf_counter()
            if first_window_s is None:
                first_window_s = now - started
            else:
                rates.append(window * source.global_batch / (now - started))
            started = now
    del task, optimizer, forward
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"samples_per_s": rates, "first_window_s": first_window_s, "flops_per_sample": flops_per_sample}
