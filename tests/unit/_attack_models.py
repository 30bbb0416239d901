"""Tiny models and data for the attack tests (CPU, milliseconds per attack)."""

from __future__ import annotations

import functools

import torch
from torch import nn

SHAPE = (3, 4, 4)


def interior_images(rows: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pixels in [0.25, 0.75]: far enough from 0 and 1 that a small eps-ball never meets the [0,1] clamp."""
    generator = torch.Generator().manual_seed(seed)
    return (0.25 + 0.5 * torch.rand((rows, *SHAPE), generator=generator)).to(dtype)


def linear_classifier(classes: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Flatten -> Linear: the CE-maximizing Linf point of a 2-class model is x - eps * sign(w_y - w_other)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, classes)).to(dtype)


def mlp(classes: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """A small nonlinear classifier (or embedder: its outputs serve as embeddings)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, classes)).to(dtype)


@functools.cache
def trained_classifier(seed: int = 0) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """An MLP trained to high clean accuracy on 3 Gaussian blobs of 3x4x4 images; returns (model, x, labels).

    Cached: attacks must not change it (the tests check that they leave parameters alone)."""
    generator = torch.Generator().manual_seed(seed)
    means = 0.3 + 0.4 * torch.rand((3, *SHAPE), generator=generator)
    labels = torch.arange(3).repeat_interleave(64)
    images = (means[labels] + 0.03 * torch.randn((labels.numel(), *SHAPE), generator=generator)).clamp(0, 1)
    model = mlp(classes=3, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    for parameter in model.parameters():
        parameter.grad = None
    return model, images, labels


class Bumpy(nn.Module):
    """logits = W2 sin(30 W1 x): many local maxima inside a small ball, so random restarts end in different places."""

    def __init__(self, classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = nn.Linear(48, 16)
        self.out = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.sin(30 * self.hidden(x.flatten(1))))
