"""Metrics of a run: per-window losses averaged over ranks, learning rates, samples/s and step time.

Rank 0 sends them to the tracker (one nested run per stage under the parent run given to ``fit``), shows a tqdm bar
when the run is local and writes per-stage progress lines to the log under Ray. Other ranks only join the all-reduce
of the window's losses. Losses are summed on device and read once per window, so logging costs no sync per step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from robustfm.config import TrackingConfig

logger = logging.getLogger("robustfm.train")


@dataclass(frozen=True)
class TrackingSpec:
    """Where rank 0 logs: the MLflow URI resolved on the driver (None: no tracking), experiment and parent run."""

    uri: str | None = None
    experiment: str = "robustfm"
    parent_run_id: str | None = None
    run_name: str = "train"

    def create_tracker(self) -> Any:
        from robustfm.tracking import create_tracker

        backend = "mlflow" if self.uri else "none"
        return create_tracker(TrackingConfig(backend=backend, uri=self.uri, experiment=self.experiment), self.uri)


class StageReporter:
    """Accumulates one stage's step metrics and emits them every ``log_every`` optimizer steps.

    Args:
        run: the stage's tracked run on rank 0 (None on other ranks).
        progress: ``"bar"`` (tqdm, local launcher), ``"log"`` (progress lines, Ray) or ``"none"``.
    """

    def __init__(
        self,
        stage_name: str,
        total_steps: int,
        start_step: int,
        group_names: Sequence[str],
        rank: int,
        world_size: int,
        device: torch.device,
        run: Any | None,
        progress: str,
        log_every: int,
    ) -> None:
        self.stage_name = stage_name
        self.total_steps = total_steps
        self.group_names = list(group_names)
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.run = run
        self.log_every = log_every
        self.progress = progress if rank == 0 else "none"
        self.bar = None
        if self.progress == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=f"stage {stage_name}", unit="step")
        self._reset()
        self.last: dict[str, float] = {}

    def _reset(self) -> None:
        self.loss_sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.samples = 0
        self.started = time.perf_counter()
        self.cpu_started = time.thread_time()

    def exclude(self, wall_s: float, cpu_s: float) -> None:
        """Leave a checkpoint's wall and CPU seconds out of the window's step times and throughput."""
        self.started += wall_s
        self.cpu_started += cpu_s

    def add_step(self, losses: Mapping[str, torch.Tensor], samples: int) -> None:
        """Add one optimizer step: its (last micro-batch's) losses and the samples it used on this rank."""
        for name, value in losses.items():
            self.loss_sums[name] = self.loss_sums.get(name, 0.0) + value
        self.steps += 1
        self.samples += samples
        if self.bar is not None:
            self.bar.update(1)

    def maybe_emit(
        self, stage_step: int, global_step: int, lrs: Sequence[float], grad_norm: float | None, force: bool = False
    ) -> dict[str, float] | None:
        """At a log step (a collective: every rank calls with the same steps), reduce and log the window.

        Returns:
            The window's record on rank 0 (other ranks: None); None when this is not a log step.
        """
        if not self.steps or not (force or global_step % self.log_every == 0):
            return None
        names = sorted(self.loss_sums)
        stacked = torch.stack([self.loss_sums[n].to(self.device) for n in names]) / self.steps
        if self.world_size > 1:
            dist.all_reduce(stacked)
            stacked /= self.world_size
        values = stacked.tolist()  # the one sync of the window
        elapsed = time.perf_counter() - self.started
        cpu = time.thread_time() - self.cpu_started
        record = {f"loss/{n}": v for n, v in zip(names, values, strict=True)}
        record.update({f"lr/{g}": lr for g, lr in zip(self.group_names, lrs, strict=True)})
        record["samples_per_s"] = self.samples * self.world_size / elapsed
        record["step_time_ms"] = 1000.0 * elapsed / self.steps
        # CPU time of the training thread: on a contended host it shows the loop's own cost; wall >> CPU on an
        # idle host means waiting (data, GPU, collectives).
        record["step_cpu_ms"] = 1000.0 * cpu / self.steps
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        self._reset()
        if self.rank != 0:
            return None
        record = {"global_step": float(global_step), "stage_step": float(stage_step), **record}
        self.last = record
        if self.run is not None:
            self.run.log_metrics(
                {k: v for k, v in record.items() if "/" in k or k.endswith(("_s", "_ms", "norm"))}, step=global_step
            )
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record.get('loss/total', float('nan')):.4g}")
        elif self.progress == "log":
            logger.info(
                "stage %s: step %d/%d (%.0f%%) loss %.4g, %.1f samples/s, %.1f ms/step",
                self.stage_name,
                stage_step,
                self.total_steps,
                100.0 * stage_step / max(1, self.total_steps),
                record.get("loss/total", float("nan")),
                record["samples_per_s"],
                record["step_time_ms"],
            )
        return record

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
