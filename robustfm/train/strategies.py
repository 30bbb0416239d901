"""Strategies: how one stage's task is wrapped, stepped and saved (DDP or DeepSpeed ZeRO), and the ``auto`` choice.

A runtime is built per stage from a freshly built task and a client torch optimizer over the stage's trainable
parameters only, so frozen parameters hold no optimizer state and never move. ``deepspeed`` is imported only when a
DeepSpeed runtime is built (inside a worker).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustfm.train.capabilities import AUTO_CHOICES, strategy_label, unsupported
from robustfm.train.config import OptimizerConfig, StageConfig, TrainConfig
from robustfm.train.task import move_batch

logger = logging.getLogger("robustfm.train")

_GIB = 1024**3
# Optimizer state bytes per fp32 trainable parameter.
_OPTIMIZER_STATE_BYTES = {"adamw": 8, "sgd": 4}
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class StrategyDecision:
    """The strategy a run uses and why (``auto`` fills ``reason`` with the memory estimate)."""

    name: str
    zero_stage: int
    reason: str


def device_memory_bytes(device: torch.device, override_gb: float | None) -> int:
    """Memory of one device: the override, the CUDA device's total, or the host's physical memory on CPU."""
    if override_gb is not None:
        return int(override_gb * _GIB)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def decide_strategy(
    cfg: TrainConfig,
    total_params: int,
    max_trainable_params: int,
    world_size: int,
    device: torch.device,
    needs: Collection[str] = frozenset(),
) -> StrategyDecision:
    """Resolve ``auto``: DDP when fp32 weights + gradients + optimizer state fit in ``auto_memory_fraction`` of one
    device; else ZeRO-2 (gradients and optimizer state partitioned over the workers) or ZeRO-3 (weights too).

    ``max_trainable_params`` is the largest trainable set over the stages: the run keeps one strategy throughout.
    ``auto`` only picks a strategy that provides every capability in ``needs`` (:mod:`robustfm.train.capabilities`);
    when none of those fits, it takes the one that holds the most and says so in the reason. A configured strategy is
    returned as is (:func:`~robustfm.train.capabilities.check_capabilities` refused it earlier if it cannot).
    """
    strategy = cfg.strategy
    if strategy.name == "ddp":
        return StrategyDecision("ddp", 0, "configured")
    if strategy.name == "deepspeed":
        return StrategyDecision("deepspeed", strategy.zero_stage, "configured")
    weights = 4 * total_params
    per_param_state = 4 + _OPTIMIZER_STATE_BYTES[cfg.optimizer.name]
    if cfg.optimizer.name == "sgd" and cfg.optimizer.momentum == 0:
        per_param_state = 4
    trainable_state = per_param_state * max_trainable_params
    budget = strategy.auto_memory_fraction * device_memory_bytes(device, strategy.device_memory_gb)
    numbers = (
        f"weights {weights / _GIB:.2f} GiB + grads/optimizer {trainable_state / _GIB:.2f} GiB vs budget "
        f"{budget / _GIB:.2f} GiB ({strategy.auto_memory_fraction:.0%} of one {device.type} device)"
    )
    fits = {
        ("ddp", 0): weights + trainable_state <= budget,
        ("deepspeed", 2): weights + trainable_state / world_size <= budget,
        ("deepspeed", 3): True,  # the last resort: weights are partitioned too
    }
    candidates = [choice for choice in AUTO_CHOICES if not unsupported(needs, *choice)]
    if not candidates:
        raise ValueError(f"no strategy auto may choose supports {sorted(needs)}")
    excluded = [strategy_label(*choice) for choice in AUTO_CHOICES if choice not in candidates]
    skipped = f"; {', '.join(excluded)} excluded: the task needs {sorted(needs)}" if excluded else ""
    for name, stage in candidates:
        if not fits[(name, stage)]:
            continue
        if name == "ddp":
            return StrategyDecision("ddp", 0, f"fits on one device: {numbers}; DDP is the fast path{skipped}")
        if stage == 2:
            return StrategyDecision(
                "deepspeed", 2, f"does not fit: {numbers}; ZeRO-2 over {world_size} workers fits{skipped}"
            )
        return StrategyDecision("deepspeed", 3, f"does not fit: {numbers}; even ZeRO-2 does not: ZeRO-3{skipped}")
    name, stage = candidates[-1]
    return StrategyDecision(
        name, stage, f"does not fit: {numbers}; {strategy_label(name, stage)} may not fit either{skipped}"
    )


def build_optimizer(
    cfg: OptimizerConfig, groups: Mapping[str, Sequence[nn.Parameter]], stage: StageConfig, device: torch.device
) -> tuple[torch.optim.Optimizer, list[str], list[float]]:
    """The client optimizer over the stage's trainable groups only.

    Returns:
        (optimizer, name of each optimizer param group, peak learning rate of each). With ``no_decay_1d`` a group
        with weight decay is split into ``name`` and ``name/no_decay`` (1-d parameters: gains and biases).
    """
    torch_groups: list[dict[str, Any]] = []
    names: list[str] = []
    for name in stage.trainable:
        decay = stage.weight_decay.get(name, 0.0)
        params = [p for p in groups[name] if p.requires_grad]
        if decay > 0 and cfg.no_decay_1d:
            split = {name: [p for p in params if p.ndim >= 2], f"{name}/no_decay": [p for p in params if p.ndim < 2]}
            decays = {name: decay, f"{name}/no_decay": 0.0}
        else:
            split, decays = {name: params}, {name: decay}
        for group_name, group_params in split.items():
            if group_params:
                torch_groups.append({"params": group_params, "lr": stage.lr[name], "weight_decay": decays[group_name]})
                names.append(group_name)
    peak_lrs = [g["lr"] for g in torch_groups]
    if cfg.name == "adamw":
        fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
        optimizer = torch.optim.AdamW(torch_groups, betas=cfg.betas, eps=cfg.eps, fused=fused or None)
    else:
        optimizer = torch.optim.SGD(torch_groups, momentum=cfg.momentum)
    return optimizer, names, peak_lrs


# DeepSpeed's default ZeRO-1/2 bucket: 5e8 elements, allocated again at every step.
DEEPSPEED_BUCKET_ELEMENTS = 500_000_000


def deepspeed_config(cfg: TrainConfig, zero_stage: int, trainable_elements: int | None = None) -> dict[str, Any]:
    """DeepSpeed's config generated from ours (no hand-kept JSON; never DeepSpeed's own ``optimizer`` block, whose
    FusedAdam JIT build fails on some CUDA arch lists: the client torch optimizer is used instead).

    ``trainable_elements`` caps ZeRO-1/2's reduce and all-gather buckets at the model's trainable size: DeepSpeed
    allocates its 5e8-element buckets at every step, and under PyTorch's deterministic mode (which fills new memory)
    that alone cost a small model ~2 s per step on a CPU."""
    precision = cfg.strategy.precision
    config: dict[str, Any] = {
        # The engine does not use DeepSpeed's data loader; the micro-batch size only feeds DeepSpeed's bookkeeping.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": _zero_section(zero_stage, trainable_elements),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        # Autocast keeps fp32 weights; DeepSpeed's ``bf16`` mode (bf16 weights) ran at 0.45x bare on an H100 and fails
        # on 0-dim parameters.
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config


def _zero_section(zero_stage: int, trainable_elements: int | None) -> dict[str, Any]:
    section: dict[str, Any] = {"stage": zero_stage}
    if zero_stage in (1, 2) and trainable_elements:
        # at least 2**20 (no tiny buckets), a multiple of 1024 (DeepSpeed asserts an alignment of its all-gathers)
        bucket = min(DEEPSPEED_BUCKET_ELEMENTS, -(-max(trainable_elements, 2**20) // 1024) * 1024)
        section.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    return section


def weighted_total(losses: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """Sum of ``weight * loss`` over the losses with a positive weight; every such loss must be present."""
    active = {name: w for name, w in weights.items() if w > 0}
    missing = sorted(set(active) - set(losses))
    if missing:
        raise KeyError(f"the stage weights losses {missing} but the task returned only {sorted(losses)}")
    return sum(w * losses[name].float() for name, w in active.items())


class StageRuntime:
    """What both runtimes share: the bare task (``module``), the client optimizer over the stage's trainable
    parameters and the device.

    The learning rates live in the client optimizer's ``param_groups`` (ZeRO wrappers share those dicts), one group
    per trainable parameter group, in the order :func:`build_optimizer` made them.
    """

    name: str

    def __init__(self, task: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.module = task
        self.optimizer = optimizer
        self.device = device

    def set_learning_rates(self, lrs: Sequence[float]) -> None:
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr

    def _cpu_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}


class DDPRuntime(StageRuntime):
    """DistributedDataParallel over the task (not wrapped with one worker: nothing to synchronise)."""

    name = "ddp"

    def __init__(
        self, task: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, device: torch.device, world_size: int
    ) -> None:
        super().__init__(task, optimizer, device)
        self.grad_clip = cfg.grad_clip
        self.accum = cfg.grad_accum_steps
        self.precision = cfg.strategy.precision
        self.model: nn.Module = task
        if world_size > 1:
            device_ids = [device.index] if device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(
                task, device_ids=device_ids, find_unused_parameters=cfg.strategy.find_unused_parameters
            )
        self.scaler = torch.amp.GradScaler(device.type) if self.precision == "fp16" else None
        self.trainable = [p for group in optimizer.param_groups for p in group["params"]]

    def micro_step(
        self, batch: Mapping[str, Any], loss_weights: Mapping[str, float], boundary: bool
    ) -> tuple[dict[str, torch.Tensor], float | None]:
        """Forward + backward of one micro-batch; at an accumulation boundary also clip and step.

        Returns:
            (detached losses incl. ``total``, gradient norm before clipping at a boundary with clipping, else None).
        """
        batch = move_batch(batch, self.device)
        sync = contextlib.nullcontext() if boundary or self.model is self.module else self.model.no_sync()
        autocast = torch.autocast(
            self.device.type,
            dtype=_AUTOCAST_DTYPES.get(self.precision, torch.bfloat16),
            enabled=self.precision != "fp32",
        )
        with sync:
            with autocast:
                losses = self.model(batch)
            total = weighted_total(losses, loss_weights)
            scaled = total / self.accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        grad_norm = None
        if boundary:
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            if self.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, self.grad_clip))
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return _detached(losses, total), grad_norm

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The task's full state (CPU copies), identical on every rank."""
        return self._cpu_state()

    def save(self, directory: Path, rank: int) -> None:
        """Rank 0 writes the optimizer (and grad scaler) state; DDP keeps them identical on every rank."""
        if rank == 0:
            state = {"optimizer": self.optimizer.state_dict()}
            if self.scaler:
                state["scaler"] = self.scaler.state_dict()
            torch.save(state, directory / "optimizer.pt")

    def load(self, directory: Path) -> None:
        state = torch.load(directory / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def close(self) -> None:
        self.model = self.module


def _skip_shared_memory_all_reduce_op() -> None:
    """Keep DeepSpeed on CPU from compiling its shared-memory all-reduce op when its communication backend starts.

    The op (``deepspeed_shm_comm``) serves only DeepSpeed's inference all-reduce (tensor-parallel inference); ZeRO
    training communicates through torch.distributed (gloo on CPU) either way. Building it costs ~35 s of g++ on the
    first run of a machine (60-90 CPU-seconds of a CI run), and every later run checks the build with ninja. Marked
    incompatible, DeepSpeed falls back to torch.distributed, as it does where the op cannot be built.
    """
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


class DeepSpeedRuntime(StageRuntime):
    """A DeepSpeed engine (ZeRO stage 0-3) over the task with the client optimizer."""

    name = "deepspeed"

    def __init__(
        self, task: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, device: torch.device, zero_stage: int
    ) -> None:
        import deepspeed

        if device.type == "cpu":
            _skip_shared_memory_all_reduce_op()
        super().__init__(task, optimizer, device)
        self.zero_stage = zero_stage
        trainable = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
        self.config = deepspeed_config(cfg, zero_stage, trainable)
        self.engine, _, _, _ = deepspeed.initialize(
            model=task, optimizer=optimizer, config=self.config, dist_init_required=False
        )
        self.engine.checkpoint_engine = _weights_only_checkpoint_engine(self.engine)
        self.float_dtype = torch.float16 if cfg.strategy.precision == "fp16" else None

    def micro_step(
        self, batch: Mapping[str, Any], loss_weights: Mapping[str, float], boundary: bool
    ) -> tuple[dict[str, torch.Tensor], float | None]:
        batch = move_batch(batch, self.device, self.float_dtype)
        losses = self.engine(batch)
        total = weighted_total(losses, loss_weights)
        self.engine.backward(total)
        # DeepSpeed counts micro-steps itself and only updates at its accumulation boundary.
        self.engine.step()
        grad_norm = None
        if boundary:
            norm = self.engine.get_global_grad_norm()
            grad_norm = None if norm is None else float(norm)
        return _detached(losses, total), grad_norm

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The task's full state on every rank (ZeRO-3 parameters gathered), as fp32-or-native CPU copies."""
        import deepspeed

        params = list(self.module.parameters())
        gather = (
            deepspeed.zero.GatheredParameters(params, modifier_rank=None)
            if self.zero_stage == 3
            else (contextlib.nullcontext())
        )
        with gather:
            return self._cpu_state()

    def save(self, directory: Path, rank: int) -> None:
        """Every rank writes its ZeRO shards (collective: all ranks must call it)."""
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state", save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(directory / "deepspeed"), tag="state", load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed state under {directory / 'deepspeed'}")

    def close(self) -> None:
        self.engine.destroy()


def _detached(losses: Mapping[str, torch.Tensor], total: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {name: loss.detach().float() for name, loss in losses.items()}
    out["total"] = total.detach().float()
    return out


def _weights_only_checkpoint_engine(engine: Any) -> Any:
    """DeepSpeed's torch checkpoint engine, but loading with ``weights_only=True`` (its default unpickles anything).

    The few non-tensor objects DeepSpeed writes into its shards (loss scaler, ZeRO stage enum) are allow-listed.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine(engine._config)


def _deepspeed_safe_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # Python 3.11.0-3.11.4 pickle an enum member as getattr(ZeroStageEnum, "gradients"), later versions by value: a
    # shard written by the first loads only with getattr allowed. The weights-only unpickler still refuses to call
    # anything getattr returns, so this only lets attributes of the classes above be read.
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, getattr]
