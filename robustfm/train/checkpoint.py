"""Checkpoint contents: the run's position, the full model, each rank's optimizer shard and RNG state.

One checkpoint is one directory; every rank writes its own files into a local directory of the same name and the
launcher merges them in storage (Ray Train merges the workers' directories). Layout::

    checkpoint_step_000000120/
      train_state.json            rank 0: position (stage, epoch, batches consumed, steps), strategy, world size,
                                  metric history; written last
      model.safetensors           rank 0: the task's full state_dict (frozen parameters included; ZeRO-3 gathered)
      optimizer.pt                DDP, mid-stage only: optimizer (+ grad scaler) state
      deepspeed/state/...         DeepSpeed, mid-stage only: every rank's ZeRO shards (*_optim_states.pt, model states)
      rng/rank_00000.pt           mid-stage only: each rank's torch / CUDA / python / numpy RNG state

A checkpoint written at the end of a stage has ``stage_complete: true`` and no optimizer or RNG files: the next stage
builds a fresh optimizer. The last checkpoint's ``model.safetensors`` is the run's exported model. Everything loads
with ``weights_only=True`` or safetensors.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "train_state.json"
MODEL_FILE = "model.safetensors"
RNG_DIR = "rng"
FORMAT_VERSION = 1


@dataclass
class TrainPosition:
    """Where a run stands. Checkpoints are only taken at optimizer-step boundaries (no half-accumulated step)."""

    stage_index: int = 0
    epoch: int = 0
    """Epoch within the stage."""
    batches_done: int = 0
    """Micro-batches of this epoch already consumed by this rank (the data source skips them on resume)."""
    stage_step: int = 0
    """Optimizer steps done in this stage (the learning-rate schedule is a function of it)."""
    global_step: int = 0
    samples_seen: int = 0
    """Samples over all ranks."""
    stage_complete: bool = False


@dataclass
class CheckpointState:
    """What ``train_state.json`` holds."""

    position: TrainPosition
    stage_name: str
    strategy: str
    zero_stage: int
    world_size: int
    history: list[dict[str, Any]] = field(default_factory=list)
    format_version: int = FORMAT_VERSION


def checkpoint_name(position: TrainPosition) -> str:
    """Directory name of a checkpoint; names sort in the order the checkpoints were taken."""
    return f"checkpoint_step_{position.global_step:09d}"


def write_checkpoint(
    directory: Path, rank: int, state: CheckpointState, model_state: dict[str, torch.Tensor] | None, runtime: Any | None
) -> None:
    """Write this rank's part of a checkpoint into ``directory`` (created).

    Args:
        model_state: the full task state (needed on rank 0 only).
        runtime: the stage's strategy runtime, whose optimizer state is saved unless the stage is complete. For
            DeepSpeed this is a collective: every rank must call.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if not state.position.stage_complete:
        runtime.save(directory, rank)
        (directory / RNG_DIR).mkdir(exist_ok=True)
        torch.save(capture_rng(), directory / RNG_DIR / f"rank_{rank:05d}.pt")
    if rank == 0:
        save_file({k: v.contiguous() for k, v in model_state.items()}, str(directory / MODEL_FILE))
        payload = asdict(state)
        (directory / STATE_FILE).write_text(json.dumps(payload, indent=1))


def read_state(directory: Path) -> CheckpointState:
    """The ``train_state.json`` of a checkpoint directory."""
    path = directory / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} is not a complete robustfm checkpoint")
    data = json.loads(path.read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {data.get('format_version')} is not {FORMAT_VERSION}")
    data["position"] = TrainPosition(**data["position"])
    return CheckpointState(**data)


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``model.safetensors`` file (a checkpoint's or the export) as a state_dict on CPU."""
    return load_file(str(path))


def capture_rng() -> dict[str, Any]:
    """This process's RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *[float(v) for v in np_state[2:]]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(directory: Path, rank: int) -> None:
    """Restore the RNG states this rank saved in the checkpoint ``directory``."""
    state = torch.load(directory / RNG_DIR / f"rank_{rank:05d}.pt", weights_only=True)
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
