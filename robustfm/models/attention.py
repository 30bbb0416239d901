"""Attention taps: the attention probabilities of a ViT image tower, and additive masks on its attention logits.

One protocol for both model families (:class:`~robustfm.models.clip.ClipModel`, open_clip's
``nn.MultiheadAttention``; :class:`~robustfm.models.timm_classifier.TimmClassifier`, timm's ``Attention``)::

    with attention_taps(model, keep_graph=True) as taps:
        score = model(pixels)[:, target].sum()
    grads = torch.autograd.grad(score, taps.probs, create_graph=True)  # differentiable again (CFT trains through it)

    prefix = attention_adapter(model).num_prefix_tokens  # class (+ register) tokens
    mask = key_mask(drop_patches, prefix)  # (B, 1, 1, T): -inf on the dropped patches' key columns
    with attention_taps(model, record=False, logit_mask=mask):
        masked = model(pixels)  # CCI: each sample of the batch with its own dropped patches

Inside the context every block's attention of *this model instance* computes
``softmax(q k^T * scale + library_mask + logit_mask) -> dropout -> @ v -> output projection`` explicitly instead of
the fused kernel, because ``F.scaled_dot_product_attention`` has no double backward (pytorch#116350: relevance
losses differentiate through an attention gradient). The change is an instance attribute ``forward`` on each attention
module, removed on exit (also on an exception); another instance of the same class is untouched, no class is patched,
no hook is registered, timm's ``fused_attn`` flags are not touched.

Outputs equal the library's own forward to float rounding (a few ulp), not bit for bit: the fused kernel sums in
another order. Attention dropout (training mode only) draws its own random numbers, not the kernel's.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from robustfm.models.clip import ClipModel
from robustfm.models.timm_classifier import TimmClassifier

#: An additive float tensor broadcastable to the logits ``(B, H, T, T)`` (see :class:`AttentionTaps`), or a callable
#: ``(block, logits) -> logits`` with ``block`` the 1-based block number, for per-block control.
LogitMask = torch.Tensor | Callable[[int, torch.Tensor], torch.Tensor]

# Attention modules whose forward is replaced right now: a second context on the same modules would silently stop the
# first one's recording, so it is refused.
_ACTIVE: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_NOT_SET = object()  # "the module had no instance attribute forward" (None could be a value)


@dataclass(frozen=True)
class ProjectedHeads:
    """What a family's explicit forward hands to the shared attention core: its projected heads and how to attend.

    Attributes:
        q, k, v: ``(B, H, T, head_dim)``, after any q/k norm.
        scale: multiplies ``q`` before ``q @ k^T`` (the library's own order, so rounding matches its math path).
        bias: the library's own additive mask for this call (None in a plain image forward).
        dropout: applied to the probabilities (the module's attention dropout).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    bias: torch.Tensor | None
    dropout: Callable[[torch.Tensor], torch.Tensor]


class Attend(Protocol):
    """The shared attention core a family's explicit forward calls with its :class:`ProjectedHeads`.

    Returns:
        ``(attention output (B, H, T, head_dim), post-softmax probabilities (B, H, T, T) before dropout)``.
    """

    def __call__(self, heads: ProjectedHeads) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class AttentionAdapter:
    """Where a wrapped model's attention is and how to compute it explicitly; built by the wrapper's
    ``attention_adapter()`` (``robustfm.models.attention_openclip`` / ``attention_timm``).

    Attributes:
        name: ``family/arch``, for error messages.
        attention_modules: the attention module of each transformer block, block 1 first.
        explicit_forward: ``(module, attend, *args, **kwargs)`` with the module's own ``forward`` contract, computing
            the projections itself and the attention through ``attend``.
        num_heads: attention heads per block.
        num_prefix_tokens: class + register tokens before the patch tokens in the token sequence.
        grid_size: patch grid ``(gh, gw)``; patch tokens follow the prefix in row-major order.
        checkpoint_flag: ``(owner, attribute)`` of the model's gradient checkpointing switch.
    """

    name: str
    attention_modules: tuple[nn.Module, ...]
    explicit_forward: Callable[..., Any]
    num_heads: int
    num_prefix_tokens: int
    grid_size: tuple[int, int]
    checkpoint_flag: tuple[object, str]


class AttentionTaps:
    """What :func:`attention_taps` yields: the recorded probabilities and the token layout.

    Attributes:
        num_blocks: transformer blocks of the image tower.
        num_heads: attention heads per block.
        num_prefix_tokens: class + register tokens; they come first in the sequence.
        grid_size: patch grid ``(gh, gw)``.
        num_tokens: ``T = num_prefix_tokens + gh * gw`` (fewer when open_clip's patch dropout is active in training).
        logit_mask: the mask applied in every block; may be reassigned between forward passes.
        record: whether probabilities are stored.
        keep_graph: store them in the autograd graph (else detached).
    """

    def __init__(self, adapter: AttentionAdapter, record: bool, logit_mask: LogitMask | None, keep_graph: bool):
        self.num_blocks = len(adapter.attention_modules)
        self.num_heads = adapter.num_heads
        self.num_prefix_tokens = adapter.num_prefix_tokens
        self.grid_size = adapter.grid_size
        self.num_tokens = adapter.num_prefix_tokens + adapter.grid_size[0] * adapter.grid_size[1]
        self.record = record
        self.keep_graph = keep_graph
        self.logit_mask = logit_mask
        self._probs: list[torch.Tensor | None] = [None] * self.num_blocks

    @property
    def probs(self) -> list[torch.Tensor]:
        """Post-softmax attention probabilities ``(B, H, T, T)`` (rows: queries, columns: keys) of the latest forward,
        one per block, block 1 first. They are the tensors the forward used (before attention dropout), so
        ``torch.autograd.grad(score, taps.probs)`` works when ``keep_graph``."""
        if not self.record:
            raise RuntimeError("attention probabilities were not recorded: open attention_taps with record=True")
        missing = [block for block, p in enumerate(self._probs, start=1) if p is None]
        if missing:
            raise RuntimeError(f"no attention recorded for blocks {missing}: run the model's forward in the context")
        return list(self._probs)  # type: ignore[arg-type]  (no None left)

    def clear(self) -> None:
        """Drop the recorded probabilities (and the graph they hold)."""
        self._probs = [None] * self.num_blocks

    def _attend(self, block: int, heads: ProjectedHeads) -> tuple[torch.Tensor, torch.Tensor]:
        logits = (heads.q * heads.scale) @ heads.k.transpose(-2, -1)
        if heads.bias is not None:
            logits = logits + heads.bias
        if self.logit_mask is not None:
            logits = _apply_logit_mask(self.logit_mask, logits, block)
        probs = logits.softmax(dim=-1)
        if self.record:
            self._probs[block - 1] = probs if self.keep_graph else probs.detach()
        return heads.dropout(probs) @ heads.v, probs


def _apply_logit_mask(mask: LogitMask, logits: torch.Tensor, block: int) -> torch.Tensor:
    batch, heads, queries, keys = logits.shape
    if not isinstance(mask, torch.Tensor):
        if not callable(mask):
            raise TypeError(f"logit_mask must be a float tensor or a callable (block, logits), not {type(mask)}")
        out = mask(block, logits)
        if not isinstance(out, torch.Tensor) or out.shape != logits.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"logit_mask callable returned {got} for block {block}, expected {tuple(logits.shape)}")
        return out
    if not mask.is_floating_point():
        raise TypeError(
            f"logit_mask must be an additive float tensor (0 keeps, -inf drops), got dtype {mask.dtype}; "
            "boolean conventions differ between libraries (key_mask builds a float one)"
        )
    expected = (batch, heads, queries, keys)
    shape = tuple(mask.shape) if mask.ndim != 3 else (mask.shape[0], 1, *mask.shape[1:])  # (B, T, T): all heads
    if len(shape) != 4 or any(size not in (1, full) for size, full in zip(shape, expected, strict=True)):
        raise ValueError(
            f"logit_mask of shape {tuple(mask.shape)} does not broadcast to the attention logits {expected} "
            f"(batch, heads, queries, keys) of block {block}: give (B, T, T), (B, 1, T, T), (B, H, T, T) or "
            "(B, 1, 1, T); a size of 1 broadcasts"
        )
    return logits + mask.reshape(shape).to(device=logits.device, dtype=logits.dtype)


def attention_adapter(model: nn.Module) -> AttentionAdapter:
    """The :class:`AttentionAdapter` of a robustfm model wrapper; a clear ``ValueError`` for anything else."""
    if not isinstance(model, (ClipModel, TimmClassifier)):
        raise ValueError(
            f"attention taps need a ViT image tower in a robustfm wrapper (ClipModel or TimmClassifier from "
            f"robustfm.models.create_model), got {type(model).__name__}; pass a DDP/DeepSpeed wrapper's .module"
        )
    return model.attention_adapter()


@contextmanager
def attention_taps(
    model: ClipModel | TimmClassifier,
    *,
    record: bool = True,
    logit_mask: LogitMask | None = None,
    keep_graph: bool = False,
) -> Iterator[AttentionTaps]:
    """Compute this model's attention explicitly inside the context: record probabilities, mask logits.

    Args:
        model: a ViT-style ``ClipModel`` (open_clip) or ``TimmClassifier`` (timm ``VisionTransformer``); any other
            model or tower raises ``ValueError`` naming it. Only the image tower's transformer blocks are tapped
            (not open_clip's text tower, nor attention-pooling heads).
        record: store each block's probabilities on every forward (:attr:`AttentionTaps.probs`, the latest
            forward's). Off saves memory for masked passes that only need outputs.
        logit_mask: added to the attention logits ``(B, H, T, T)`` of every block after scaling and before the
            softmax. A float tensor of shape ``(B, T, T)``, ``(B, 1, T, T)``, ``(B, H, T, T)`` or ``(B, 1, 1, T)``
            (leading 1 broadcasts over the batch), moved to the logits' device and dtype; 0 keeps, ``-inf`` drops a
            key (:func:`key_mask`). Each sample of a batch gets its own mask row, so K masked passes and the clean
            pass run as one batch. Or a callable ``(block, logits) -> logits`` (block 1-based) for per-block control.
        keep_graph: keep the recorded probabilities in the autograd graph (relevance maps, CFT's training through
            them, double backward); else they are detached.

    Yields:
        :class:`AttentionTaps`. Gradient checkpointing is switched off inside the context (a block recomputed in
        the backward pass would run the taps again and overwrite the records) and restored on exit.

    Raises:
        RuntimeError: taps are already active on this model.
    """
    adapter = attention_adapter(model)
    if any(module in _ACTIVE for module in adapter.attention_modules):
        raise RuntimeError(f"{adapter.name}: attention taps are already active on this model (nested contexts)")
    taps = AttentionTaps(adapter, record, logit_mask, keep_graph)
    owner, flag = adapter.checkpoint_flag
    checkpointing = getattr(owner, flag)
    replaced: list[tuple[nn.Module, Any]] = []
    try:
        setattr(owner, flag, False)
        for block, module in enumerate(adapter.attention_modules, start=1):
            replaced.append((module, module.__dict__.get("forward", _NOT_SET)))
            _ACTIVE.add(module)
            # An instance attribute shadows the class's forward for this module only; nn.Module.__call__ reads
            # self.forward, so hooks on the module still run around it.
            module.forward = functools.partial(adapter.explicit_forward, module, functools.partial(taps._attend, block))
        yield taps
    finally:
        for module, previous in reversed(replaced):
            if previous is _NOT_SET:
                del module.__dict__["forward"]
            else:
                module.forward = previous
            _ACTIVE.discard(module)
        setattr(owner, flag, checkpointing)


def key_mask(drop: torch.Tensor, num_prefix_tokens: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An additive key-column mask: every query of every head ignores the dropped patches (CCI, paper 002 §3).

    ``-inf`` rather than a large negative number: the dropped keys get exactly zero probability in any dtype (a
    finite number like ``finfo.min`` overflows to ``-inf`` or leaks weight in bf16/fp16 once added to logits). The
    softmax stays finite because every row keeps at least one key: prefix (class/register) columns are never masked,
    and without prefix tokens a sample that drops every patch is refused.

    Args:
        drop: bool ``(B, num_patches)``, True where the patch is dropped as a key, patches in row-major grid order.
        num_prefix_tokens: class + register tokens before the patches (``AttentionTaps.num_prefix_tokens``).
        dtype: of the mask (it is cast to the logits' dtype when applied).

    Returns:
        ``(B, 1, 1, T)`` with ``T = num_prefix_tokens + num_patches``: 0 on kept columns, ``-inf`` on dropped ones;
        it broadcasts over heads and query rows.
    """
    if drop.dtype != torch.bool or drop.ndim != 2:
        raise ValueError(f"drop must be a bool tensor (B, num_patches), got {drop.dtype} of shape {tuple(drop.shape)}")
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be an integer >= 0, got {num_prefix_tokens!r}")
    if num_prefix_tokens == 0 and drop.shape[1] > 0 and bool(drop.all(dim=1).any()):
        sample = int(drop.all(dim=1).nonzero()[0])
        raise ValueError(
            f"sample {sample} drops every key and the model has no prefix token: its softmax rows would be 0/0 (NaN)"
        )
    batch, patches = drop.shape
    mask = torch.zeros(batch, 1, 1, num_prefix_tokens + patches, dtype=dtype, device=drop.device)
    mask[:, 0, 0, num_prefix_tokens:].masked_fill_(drop, float("-inf"))
    return mask


def key_mask_from_patch_groups(
    groups: torch.Tensor, drop_groups: torch.Tensor, num_prefix_tokens: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """:func:`key_mask` dropping, in sample ``b``, the patches whose group label is ``drop_groups[b]``.

    For CCI's K cluster-masked passes and the clean pass of one image with patch cluster labels ``labels (P,)``:
    ``groups = labels.expand(K + 1, P)``, ``drop_groups = torch.arange(-1, K)`` (-1 matches no label: the clean row).

    Args:
        groups: integer ``(B, num_patches)``, a group (cluster) label per patch in row-major grid order.
        drop_groups: integer ``(B,)``, the label each sample drops; a label absent from the row drops nothing.
        num_prefix_tokens: class + register tokens before the patches.
        dtype: of the mask.

    Returns:
        ``(B, 1, 1, T)`` additive mask, ``-inf`` on the dropped key columns.
    """
    if groups.ndim != 2 or groups.is_floating_point() or groups.dtype == torch.bool:
        raise ValueError(f"groups must be an integer tensor (B, num_patches), got {groups.dtype} {tuple(groups.shape)}")
    if drop_groups.shape != groups.shape[:1] or drop_groups.is_floating_point() or drop_groups.dtype == torch.bool:
        raise ValueError(
            f"drop_groups must be an integer tensor ({groups.shape[0]},) (one label per sample of groups), got "
            f"{drop_groups.dtype} {tuple(drop_groups.shape)}"
        )
    return key_mask(groups == drop_groups.to(groups.device)[:, None], num_prefix_tokens, dtype)
