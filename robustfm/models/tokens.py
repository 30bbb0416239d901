"""Block numbering and token-layout checks shared by the open_clip and timm wrappers."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def block_indices(blocks: Sequence[int], num_blocks: int) -> list[int]:
    """Validate 1-based block numbers and return the sorted, de-duplicated 0-based indices."""
    for block in blocks:
        if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= num_blocks:
            raise ValueError(f"blocks must be integers in 1..{num_blocks} (1-based transformer blocks), got {block!r}")
    return sorted({block - 1 for block in blocks})


def check_tokens(tokens: torch.Tensor, batch: int, grid_size: tuple[int, int], width: int, block: int) -> torch.Tensor:
    """Fail loudly if a library returned tokens in another layout (seq-first, with prefix tokens, ...)."""
    expected = (batch, grid_size[0] * grid_size[1], width)
    if tuple(tokens.shape) != expected:
        raise RuntimeError(
            f"tokens after block {block} have shape {tuple(tokens.shape)}, expected batch-first patch tokens {expected}"
            " (N, gh*gw, width); the installed library version lays them out differently"
        )
    return tokens
