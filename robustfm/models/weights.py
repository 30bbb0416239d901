"""Weights on disk: safetensors save/load, torch checkpoints read safely, and errors that say what to do.

Every checkpoint robustfm reads goes through :func:`read_state_dict` (safetensors, or ``torch.load`` with
``weights_only=True``) and is matched against the module with :func:`load_checked_state_dict`, which lists the missing,
unexpected and mis-shaped keys and names the file instead of failing inside ``load_state_dict``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from robustfm.registry import did_you_mean

#: File suffixes that mark a ``pretrained`` value as a local path even when the file does not exist (yet).
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_LISTED_KEYS = 8  # keys shown per category in a mismatch message; the count is always given


class PretrainedUnavailableError(RuntimeError):
    """A pretrained tag whose weights could not be fetched (offline, or the hub is unreachable)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not match the model it is loaded into."""


def is_local_weights(pretrained: str, known_tags: Sequence[str] = ()) -> bool:
    """Whether ``pretrained`` names a file rather than a library tag.

    A known tag always wins; otherwise an existing file, a path separator or a weights suffix marks a path.
    """
    if pretrained in known_tags:
        return False
    return os.path.isfile(pretrained) or os.sep in pretrained or pretrained.endswith(WEIGHT_SUFFIXES)


def check_pretrained_tag(model_name: str, tag: str, known_tags: Sequence[str]) -> None:
    """Raise a ``ValueError`` naming the tags of ``model_name`` (and the closest one) unless ``tag`` is one of them."""
    if tag in known_tags:
        return
    listed = ", ".join(known_tags) if known_tags else "none"
    raise ValueError(
        f"model.pretrained={tag!r} is neither a pretrained tag of {model_name}{did_you_mean(tag, list(known_tags))} "
        f"nor an existing weights file. Tags of {model_name}: {listed}. For local weights pass a path, e.g. "
        f"model.pretrained=/path/to/weights.safetensors"
    )


def pretrained_unavailable(model_name: str, tag: str, cause: BaseException) -> PretrainedUnavailableError:
    """The error raised when a pretrained tag cannot be downloaded: says how to use local weights instead."""
    return PretrainedUnavailableError(
        f"could not fetch pretrained weights {tag!r} for {model_name} ({type(cause).__name__}: {cause}). "
        f"Without internet access (HF_HUB_OFFLINE=1, or no route to the hub) download them on a machine that has "
        f"it, copy the file here and pass its path instead of the tag: model.pretrained=/path/to/weights.safetensors "
        f"(a .safetensors file, or a torch checkpoint that loads with weights_only=True)."
    )


@dataclass(frozen=True)
class WeightsChoice:
    """Where a model builder takes the weights from; at most one of ``tag`` and ``file`` is set (neither: random
    init)."""

    model_name: str
    """``family/arch``, for messages."""
    tag: str | None = None
    """A known pretrained tag of the architecture: the builder fetches it, raising :meth:`unavailable` on failure."""
    file: str | None = None
    """A local weights file: the builder builds at random init, then loads :meth:`state_dict` into the model."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The local file's state dict (:func:`read_state_dict`)."""
        if self.file is None:
            raise ValueError(f"{self.model_name}: no local weights file was chosen")
        return read_state_dict(self.file)

    def unavailable(self, cause: BaseException) -> PretrainedUnavailableError:
        """The error to raise when the tag's weights cannot be fetched (:func:`pretrained_unavailable`)."""
        return pretrained_unavailable(self.model_name, str(self.tag), cause)


def choose_weights(model_name: str, pretrained: str | None, known_tags: Sequence[str]) -> WeightsChoice:
    """Read a builder's ``pretrained`` argument: None is random init, a path a local file (:func:`is_local_weights`),
    anything else must be one of ``known_tags``.

    Raises:
        ValueError: naming the architecture's tags when ``pretrained`` is neither a file nor a known tag.
    """
    if pretrained is None:
        return WeightsChoice(model_name)
    if is_local_weights(pretrained, known_tags):
        return WeightsChoice(model_name, file=pretrained)
    check_pretrained_tag(model_name, pretrained, known_tags)
    return WeightsChoice(model_name, tag=pretrained)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch checkpoint (``weights_only=True``), onto the CPU.

    Torch checkpoints that wrap the weights (``{"state_dict": ...}``, as open_clip's training saves them) are unwrapped,
    and the ``module.`` prefix DDP adds is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors come in many types; all mean the same thing here
        raise ValueError(
            f"{str(path)!r} is not a torch checkpoint that loads with weights_only=True ({error}); "
            f"save plain tensors (torch.save(model.state_dict(), ...)) or use .safetensors"
        ) from error
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise ValueError(f"{str(path)!r} does not hold a state dict (a mapping of names to tensors)")
    state = dict(loaded)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop ``prefix`` from every key when every key carries it (a wrapper's state dict); otherwise return a copy."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def _shared_groups(state: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Groups of names (two or more, in ``state`` order) that view the same memory, e.g. tied embeddings."""
    groups: dict[tuple, list[str]] = {}
    for name, tensor in state.items():
        if tensor.numel() == 0 or tensor.device.type == "meta":
            continue
        key = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tensor.shape,
            tensor.stride(),
        )
        groups.setdefault(key, []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _listed(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_LISTED_KEYS])
    more = f", ... ({len(keys) - _LISTED_KEYS} more)" if len(keys) > _LISTED_KEYS else ""
    return f"{len(keys)} [{shown}{more}]"


def load_checked_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module`` strictly, raising :class:`CheckpointMismatchError` that names ``source`` and
    lists missing, unexpected and mis-shaped keys. Names that share memory in ``module`` (tied weights) may appear
    in ``state`` under any one of their names."""
    expected = module.state_dict()
    state = dict(state)
    for group in _shared_groups(expected):
        present = [name for name in group if name in state]
        if present:
            for name in group:
                state.setdefault(name, state[present[0]])
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys {_listed(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_listed(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches {_listed(mismatched)}")
        raise CheckpointMismatchError(
            f"{source} does not match {type(module).__name__} ({len(expected)} keys): {'; '.join(problems)}. "
            "Is it the weights of another architecture?"
        )
    module.load_state_dict(state, strict=True)


def save_weights(module: nn.Module, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """Save ``module.state_dict()`` as safetensors, atomically (a temp file renamed into place).

    Tensors that share memory (tied weights) are stored once, under their first name in ``state_dict()`` order;
    :func:`load_weights` restores the other names. ``metadata`` is stored as string key/values in the header.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = module.state_dict()
    for group in _shared_groups(state):
        for alias in group[1:]:
            del state[alias]
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, tmp, metadata=dict(metadata or {}))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_weights(module: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load weights saved by :func:`save_weights` (or any state dict file of ``module``), strictly.

    Returns:
        ``module``, with its weights replaced.
    """
    load_checked_state_dict(module, read_state_dict(path), source=str(path))
    return module
