"""Configs of the training engine: stages, strategy, optimizer, launcher, storage and checkpoints.

Everything here is checked when the config is built (``load_config(TrainConfig, ...)``), so that an unknown strategy,
ZeRO stage 4 or a negative learning rate fails with the dotted field name before Ray or any worker starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from robustfm.config.core import FrozenDict, check


@dataclass(frozen=True)
class StageConfig:
    """One stage of a run: which parameter groups train, at which learning rates, on which weighted losses."""

    trainable: tuple[str, ...]
    """Names of the task's parameter groups that train in this stage (``Task.param_groups()`` keys). Every other
    parameter is frozen: ``requires_grad=False``, not given to the optimizer, so it holds no optimizer state."""
    lr: dict[str, float]
    """Peak learning rate per trainable group; every group in ``trainable`` needs one, and only those."""
    epochs: int = 1
    """Passes over the data in this stage."""
    weight_decay: dict[str, float] = field(default_factory=FrozenDict)
    """Decoupled weight decay per trainable group (absent: 0)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to the peak learning rate."""
    schedule: Literal["cosine", "constant", "step"] = "cosine"
    """After warmup: cosine decay to ``min_lr_ratio`` x peak over the stage's steps, constant, or ``step``: peak x
    ``step_gamma`` ** floor(epoch / ``step_every_epochs``), the epoch counted within the stage (the CFT authors'
    ``lr * 0.85 ** (epoch // 2)``)."""
    step_gamma: float = 0.85
    """``step`` schedule: factor applied every ``step_every_epochs`` epochs."""
    step_every_epochs: int = 2
    """``step`` schedule: epochs between two decays."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine decay as a fraction of each group's peak learning rate."""
    loss_weights: dict[str, float] = field(default_factory=FrozenDict)
    """Weight of each named loss of the task in the total. A loss with weight 0 or absent is left out of the total,
    and the task is told which losses count (``StageSpec.active_losses``) so it may skip computing the others."""
    max_batches_per_epoch: int | None = None
    """Use at most this many batches per epoch and rank (None: all the source has). For smoke runs and benchmarks."""
    settings: dict[str, Any] = field(default_factory=FrozenDict)
    """The method's settings that differ in this stage, by dotted name (``{"attack.eps": 0.0157}``; nested mappings
    are flattened to dotted names). The task gets them with the stage (``Task.configure_stage``), applies them and
    rejects names it does not have, before any worker starts. Empty: the method's own settings."""

    def __post_init__(self) -> None:
        check(len(self.trainable) > 0, "trainable", self.trainable, "must name at least one parameter group")
        check(len(set(self.trainable)) == len(self.trainable), "trainable", self.trainable, "must not repeat a group")
        check(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        missing = [g for g in self.trainable if g not in self.lr]
        check(not missing, "lr", dict(self.lr), f"needs a learning rate for every trainable group (missing {missing})")
        extra = [g for g in self.lr if g not in self.trainable]
        check(not extra, "lr", dict(self.lr), f"names groups that are not trainable in this stage: {extra}")
        for group, value in self.lr.items():
            check(value > 0, f"lr.{group}", value, "must be a positive learning rate")
        for group, value in self.weight_decay.items():
            check(group in self.trainable, f"weight_decay.{group}", value, "names a group that is not trainable")
            check(value >= 0, f"weight_decay.{group}", value, "must be >= 0")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        check(0.0 < self.step_gamma <= 1.0, "step_gamma", self.step_gamma, "must be in (0, 1]")
        check(self.step_every_epochs >= 1, "step_every_epochs", self.step_every_epochs, "must be >= 1")
        check(len(self.loss_weights) > 0, "loss_weights", dict(self.loss_weights), "must weight at least one loss")
        for name, weight in self.loss_weights.items():
            check(weight >= 0, f"loss_weights.{name}", weight, "must be >= 0")
        check(
            any(w > 0 for w in self.loss_weights.values()),
            "loss_weights",
            dict(self.loss_weights),
            "must give at least one loss a positive weight",
        )
        check(
            self.max_batches_per_epoch is None or self.max_batches_per_epoch >= 1,
            "max_batches_per_epoch",
            self.max_batches_per_epoch,
            "must be >= 1",
        )
        object.__setattr__(self, "settings", FrozenDict(_flat_settings(self.settings, "settings")))


def _flat_settings(settings: Mapping[str, Any], field_name: str, prefix: str = "") -> dict[str, Any]:
    """``{"attack": {"eps": 1}}`` -> ``{"attack.eps": 1}`` (lists become tuples: the config stays hashable)."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        check(
            isinstance(key, str) and all(key.split(".")),
            field_name,
            key,
            "names must be non-empty dotted names like 'attack.eps'",
        )
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            found = _flat_settings(value, field_name, f"{name}.")
        else:
            found = {name: tuple(value) if isinstance(value, list) else value}
        for found_name, found_value in found.items():
            check(found_name not in flat, f"{field_name}.{found_name}", found_value, "is given twice (flat and nested)")
            flat[found_name] = found_value
    return flat


@dataclass(frozen=True)
class StrategyConfig:
    """How gradients are synchronised and optimizer state is held across workers."""

    name: Literal["auto", "ddp", "deepspeed"] = "auto"
    """``ddp``: PyTorch DistributedDataParallel, every worker holds everything (the fast path when it fits).
    ``deepspeed``: ZeRO at ``zero_stage``. ``auto``: DDP when weights + gradients + optimizer state fit in
    ``auto_memory_fraction`` of one device, else ZeRO-2 (or ZeRO-3 when even that does not fit); the decision and its
    numbers are logged. Measured on one H100 (ViT-B/32): DDP runs at the bare loop's speed, ZeRO-2 at 0.54-0.70x."""
    zero_stage: int = 2
    """ZeRO stage used when the strategy is ``deepspeed`` (0: plain data parallel inside DeepSpeed; 1: optimizer
    state partitioned; 2: + gradients; 3: + parameters)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """``bf16``: torch autocast to bfloat16 (DeepSpeed's ``torch_autocast``; weights and optimizer stay fp32).
    ``fp16``: DDP uses autocast + a gradient scaler; DeepSpeed uses its ``fp16`` mode (fp16 weights, fp32 master
    copy, dynamic loss scaling). ``fp32``: no mixed precision."""
    auto_memory_fraction: float = 0.6
    """``auto``: share of one device's memory that weights, gradients and optimizer state may take under DDP (the
    rest is left to activations)."""
    device_memory_gb: float | None = None
    """``auto``: memory of one device in GiB (None: measured; on CPU the host's memory)."""
    find_unused_parameters: bool = False
    """DDP: allow trainable parameters that get no gradient in a step (slower; needed when a task skips a branch)."""

    def __post_init__(self) -> None:
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage", self.zero_stage, "must be 0, 1, 2 or 3")
        check(
            0 < self.auto_memory_fraction <= 1, "auto_memory_fraction", self.auto_memory_fraction, "must be in (0, 1]"
        )
        check(
            self.device_memory_gb is None or self.device_memory_gb > 0,
            "device_memory_gb",
            self.device_memory_gb,
            "must be positive",
        )


@dataclass(frozen=True)
class OptimizerConfig:
    """The client torch optimizer (DeepSpeed wraps it; its own ``optimizer`` block is never used)."""

    name: Literal["adamw", "sgd"] = "adamw"
    """``adamw`` (decoupled weight decay) or ``sgd`` (with ``momentum``)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""
    eps: float = 1e-6
    """AdamW epsilon."""
    momentum: float = 0.9
    """SGD momentum (0: plain SGD)."""
    fused: bool | None = None
    """Use the fused CUDA kernel of AdamW (None: on CUDA only)."""
    no_decay_1d: bool = True
    """Exempt gains, biases and other 1-d parameters from weight decay (CLIP's convention)."""

    def __post_init__(self) -> None:
        check(all(0 <= b < 1 for b in self.betas), "betas", self.betas, "must be in [0, 1)")
        check(self.eps > 0, "eps", self.eps, "must be positive")
        check(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """A training run: ordered stages, strategy, launcher, workers, storage and checkpoints."""

    stages: dict[str, StageConfig]
    """Stages in the order they run, by name (the name is used for the nested tracking run and checkpoints)."""
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    """DDP, DeepSpeed ZeRO or automatic choice; precision."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """The client optimizer, rebuilt for every stage."""
    launcher: Literal["ray", "local"] = "ray"
    """``ray``: Ray Train ``TorchTrainer`` workers. ``local``: no Ray; one process (``num_workers`` > 1 spawns that
    many local processes with torch.multiprocessing), for debugging and quick GPU checks."""
    num_workers: int = 1
    """Training workers (data-parallel ranks)."""
    use_gpu: bool = False
    """One GPU per worker (CUDA, NCCL); else CPU and gloo."""
    resources_per_worker: dict[str, float] = field(default_factory=FrozenDict)
    """Ray resources each worker reserves, e.g. ``{CPU: 0.5}`` (fractions allowed: leave cores to Ray Data
    stages, or they starve and the run hangs) or ``{CPU: 8, GPU: 1}``. Empty: Ray's default (1 CPU, + 1 GPU)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step. Each epoch uses a whole number of steps (the remainder is dropped)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping)."""
    seed: int = 0
    """Seeds model initialisation (same on every rank) and each rank's RNG per stage and epoch."""
    storage_path: str = "runs"
    """Where runs, checkpoints and the export go: a local directory or ``s3://bucket/prefix``."""
    storage_endpoint_url: str | None = None
    """Endpoint of an S3-compatible store (MinIO, a test server), e.g. ``http://127.0.0.1:9000``. None: AWS.
    Credentials come from the standard ``AWS_*`` environment variables of the driver."""
    checkpoint_every_steps: int = 0
    """Also checkpoint every N optimizer steps (0: only at the end of each stage)."""
    keep_checkpoints: int | None = 2
    """Checkpoints kept in storage, newest first (None: all)."""
    max_failures: int = 0
    """Ray: worker-group restarts allowed; each restart resumes from the latest checkpoint."""
    log_every_steps: int = 10
    """Log losses, learning rates, samples/s and step time every N optimizer steps (rank 0)."""
    fail_at_step: int | None = None
    """Test hook: every worker dies (``os._exit``) right after optimizer step N, but only in an attempt that did not
    start from a checkpoint. Used to test resume; leave None."""

    def __post_init__(self) -> None:
        check(len(self.stages) > 0, "stages", dict(self.stages), "must hold at least one stage")
        check(self.num_workers >= 1, "num_workers", self.num_workers, "must be >= 1")
        for key, value in self.resources_per_worker.items():
            check(value > 0, f"resources_per_worker.{key}", value, "must be positive")
        check(
            self.use_gpu or "GPU" not in self.resources_per_worker,
            "resources_per_worker.GPU",
            self.resources_per_worker.get("GPU"),
            "asks for GPUs while use_gpu is false (Ray Train would refuse it after Ray started)",
        )
        check(self.grad_accum_steps >= 1, "grad_accum_steps", self.grad_accum_steps, "must be >= 1")
        check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)")
        check(bool(self.storage_path), "storage_path", self.storage_path, "must not be empty")
        check(self.checkpoint_every_steps >= 0, "checkpoint_every_steps", self.checkpoint_every_steps, "must be >= 0")
        check(
            self.keep_checkpoints is None or self.keep_checkpoints >= 1,
            "keep_checkpoints",
            self.keep_checkpoints,
            "must be >= 1 or null",
        )
        check(self.max_failures >= -1, "max_failures", self.max_failures, "must be >= 0 (-1: unlimited)")
        check(self.log_every_steps >= 1, "log_every_steps", self.log_every_steps, "must be >= 1")
        check(self.fail_at_step is None or self.fail_at_step >= 1, "fail_at_step", self.fail_at_step, "must be >= 1")
        if self.strategy.name in ("deepspeed", "auto"):
            # DeepSpeed's fp16 mode (fp16 weights + loss scaler) is built for CUDA; on CPU bf16 autocast works.
            check(
                not (self.strategy.precision == "fp16" and not self.use_gpu),
                "strategy.precision",
                self.strategy.precision,
                "fp16 needs use_gpu (DeepSpeed's fp16 mode is CUDA-only); use bf16 on CPU",
            )
