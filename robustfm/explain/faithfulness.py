"""Deletion and insertion faithfulness curves of attribution maps (paper 002 §3.1, spec §1.5).

Pixels are ranked by the bilinearly upsampled map (highest first; ties broken by a random permutation seeded per
image). Step ``k`` of ``steps`` changes the ``round(k * fraction_per_step * H * W)`` top-ranked pixels (all channels,
rounding half up):

- deletion: they are replaced by U[0, 1] noise (one noise image per sample, fixed across steps, seeded), step 0 is
  the clean image;
- insertion: they are revealed on a constant canvas (default 0), step 0 is the canvas.

At every step the target class's rank (0 = top-1) and softmax probability are stored, so top-1, top-5 and
probability curves come from one pass; :func:`curve_auc` integrates a curve with the trapezoid rule over the
normalised step ``x = k / steps`` in [0, 1] (spec §0.10: the paper's insertion AUC@5 of 0.65 rules out a pixel-fraction
axis). Deletion: lower is better; insertion: higher is better. The ``N * (steps + 1)`` images run in chunks of
``batch_size``, never one image at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("deletion", "insertion")


@dataclass(frozen=True)
class FaithfulnessCurves:
    """Per-image curves over ``steps + 1`` points (step 0 included).

    Attributes:
        mode: ``"deletion"`` or ``"insertion"``.
        fraction_per_step: fraction of the pixels changed per step.
        steps: number of steps.
        ranks: ``(N, steps + 1)`` long, the target's rank among the classes (0: top-1; ties count in its favour).
        probs: ``(N, steps + 1)`` the target's softmax probability.
    """

    mode: str
    fraction_per_step: float
    steps: int
    ranks: torch.Tensor
    probs: torch.Tensor

    def topk(self, k: int) -> torch.Tensor:
        """``(N, steps + 1)`` float: 1 where the target is among the top ``k`` classes."""
        return (self.ranks < k).float()

    def auc(self, curve: str = "prob") -> torch.Tensor:
        """``(N,)`` AUC of ``"prob"``, ``"top1"`` or ``"top5"`` (any ``"top<k>"``); average it over images."""
        if curve == "prob":
            return curve_auc(self.probs)
        if curve.startswith("top") and curve[3:].isdigit():
            return curve_auc(self.topk(int(curve[3:])))
        raise ValueError(f"curve must be 'prob' or 'top<k>' (e.g. 'top1', 'top5'), got {curve!r}")


def curve_auc(values: torch.Tensor) -> torch.Tensor:
    """Trapezoid-rule area of curves ``(N, steps + 1)`` over ``x = step / steps`` in [0, 1]."""
    if values.ndim != 2 or values.shape[1] < 2:
        raise ValueError(f"curves must be (N, steps + 1) with steps >= 1, got shape {tuple(values.shape)}")
    values = values.double()
    return ((values[:, 1:] + values[:, :-1]) / 2).sum(dim=1) / (values.shape[1] - 1)


def pixels_at_step(step: int, fraction_per_step: float, num_pixels: int) -> int:
    """Pixels changed at ``step``: ``round(step * fraction_per_step * num_pixels)``, half up."""
    return math.floor(step * fraction_per_step * num_pixels + 0.5)


def check_schedule(fraction_per_step: float, steps: int) -> None:
    """``ValueError`` naming the fields unless ``0 < fraction_per_step``, ``steps >= 1`` and their product <= 1."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not fraction_per_step > 0:
        raise ValueError(f"fraction_per_step must be > 0, got {fraction_per_step!r}")
    if fraction_per_step * steps > 1 + 1e-9:
        raise ValueError(
            f"fraction_per_step * steps = {fraction_per_step} * {steps} = {fraction_per_step * steps:g} > 1: the "
            "schedule would change more pixels than the image has"
        )


def image_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, ``torch.Generator().manual_seed(seed)``: its tie-break permutation is drawn first,
    then (deletion) its noise."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def pixel_ranking(maps: torch.Tensor, size: tuple[int, int], generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Each pixel's position in its image's ranking, ``(N, H * W)`` long (0: the most relevant pixel).

    The maps ``(N, h, w)`` are bilinearly upsampled to ``size`` (already that size: used as is); equal values are
    ordered by a random permutation drawn from the image's generator (:func:`image_generators`).
    """
    if maps.ndim != 3 or maps.shape[0] != len(generators):
        raise ValueError(f"maps must be (N, h, w) with one seed per map, got {tuple(maps.shape)} and {len(generators)}")
    up = maps.detach().float()
    if tuple(up.shape[1:]) != tuple(size):
        up = F.interpolate(up[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    flat = up.flatten(1).cpu()
    num = flat.shape[1]
    positions = torch.empty(flat.shape, dtype=torch.long)
    for row, generator in enumerate(generators):  # a permutation per image (cheap); the forwards below are batched
        perm = torch.randperm(num, generator=generator)
        order = perm[torch.sort(flat[row, perm], descending=True, stable=True).indices]
        positions[row, order] = torch.arange(num)
    return positions.to(maps.device)


def faithfulness_curves(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    pixels: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    *,
    mode: str,
    seeds: Sequence[int],
    logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    fraction_per_step: float = 0.005,
    steps: int = 100,
    canvas: float = 0.0,
    batch_size: int = 64,
) -> FaithfulnessCurves:
    """Deletion or insertion curves of ``maps`` for ``model`` on ``pixels``.

    Args:
        model: called on ``(M, 3, H, W)`` [0, 1] pixels; its outputs go through ``logits_fn``.
        pixels: ``(N, 3, H, W)`` in [0, 1].
        maps: ``(N, h, w)`` attributions (any resolution; higher = more relevant).
        targets: ``(N,)`` class indices whose rank and probability are tracked.
        mode: ``"deletion"`` or ``"insertion"``.
        seeds: one integer per image, for its tie-break permutation and (deletion) its noise.
        logits_fn: outputs -> class logits ``(M, C)``; None: the outputs are the logits (classifiers). For CLIP, the
            zero-shot logits, e.g. ``lambda e: 100 * F.normalize(e, dim=-1) @ text.T`` with unit text embeddings.
        fraction_per_step: pixels changed per step, as a fraction of ``H * W`` (paper: ~0.5 %).
        steps: number of steps (paper: 100, i.e. half the image).
        canvas: insertion's background value.
        batch_size: images per forward.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_schedule(fraction_per_step, steps)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch, _, height, width = pixels.shape
    if targets.shape != (batch,) or targets.is_floating_point():
        raise ValueError(
            f"targets must be integer class indices ({batch},), got {targets.dtype} {tuple(targets.shape)}"
        )
    generators = image_generators(seeds)
    positions = pixel_ranking(maps, (height, width), generators).reshape(batch, 1, height, width)
    if mode == "deletion":
        fill = torch.stack([torch.rand(pixels.shape[1:], generator=generator) for generator in generators])
        fill = fill.to(pixels.device, pixels.dtype)
    else:
        fill = torch.full_like(pixels, float(canvas))
    counts = torch.tensor([pixels_at_step(k, fraction_per_step, height * width) for k in range(steps + 1)])
    image = torch.arange(batch).repeat_interleave(steps + 1).to(pixels.device)
    count = counts.repeat(batch).to(pixels.device)
    targets = targets.long().to(pixels.device)
    ranks, probs = [], []
    with torch.no_grad():
        for start in range(0, image.numel(), batch_size):
            rows, changed = image[start : start + batch_size], count[start : start + batch_size]
            selected = positions[rows] < changed[:, None, None, None]  # (M, 1, H, W): broadcasts over channels
            if mode == "deletion":
                images = torch.where(selected, fill[rows], pixels[rows])
            else:
                images = torch.where(selected, pixels[rows], fill[rows])
            outputs = model(images)
            logits = (outputs if logits_fn is None else logits_fn(outputs)).float()
            target_logit = logits.gather(1, targets[rows, None])
            ranks.append((logits > target_logit).sum(dim=1))
            probs.append(logits.softmax(dim=1).gather(1, targets[rows, None])[:, 0])
    shape = (batch, steps + 1)
    return FaithfulnessCurves(
        mode, float(fraction_per_step), steps, torch.cat(ranks).reshape(shape), torch.cat(probs).reshape(shape)
    )
