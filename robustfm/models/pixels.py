"""[0,1] pixels in, the backbone's own mean/std normalization inside the model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class PixelNormalize(nn.Module):
    """``(pixels - mean) / std`` for float RGB pixels in [0, 1] of a fixed square size.

    The statistics are non-persistent buffers: they follow ``.to(device)`` but stay out of state dicts, so exported
    weights load into the plain open_clip/timm model unchanged.

    Args:
        mean: per-channel mean of the backbone's preprocessing (e.g. CLIP's or ImageNet's).
        std: per-channel standard deviation.
        image_size: the side the backbone expects; other sizes are rejected with a clear message.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], image_size: int) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"pixel normalization needs 3 channel means and stds, got mean={mean}, std={std}")
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Normalize ``pixels`` (N, 3, S, S) and cast to ``dtype`` (the weights' dtype, so bf16 models accept fp32
        batches)."""
        expected = (3, self.image_size, self.image_size)
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != expected:
            shape = ", ".join(map(str, expected))
            raise ValueError(f"expected [0,1] pixels of shape (N, {shape}), got {tuple(pixels.shape)}")
        normalized = (pixels.float() - self.mean.float()) / self.std.float()
        return normalized if dtype is None else normalized.to(dtype)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}, image_size={self.image_size}"
