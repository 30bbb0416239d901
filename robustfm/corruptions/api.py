"""Applying corruptions: one corruption to a batch, or a different (name, severity, seed) per sample."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from robustfm.corruptions.base import CORRUPTIONS, check_images, check_severity
from robustfm.corruptions.ops import stack_draws


def make_draws(images: Tensor, name: str, severity: int, generators: Sequence[torch.Generator]) -> dict[str, Tensor]:
    """The stacked per-sample random draws of corruption ``name`` (empty for deterministic corruptions).

    Sample ``i``'s draws come from ``generators[i]`` and its own image only.
    """
    corruption = CORRUPTIONS.get(name)
    severity = check_severity(severity)
    if corruption.draw is None:
        return {}
    if len(generators) != images.shape[0]:
        raise ValueError(f"corruption {name!r}: got {len(generators)} generators for a batch of {images.shape[0]}")
    per_sample = [corruption.draw(images[i], severity, g) for i, g in enumerate(generators)]
    return stack_draws(per_sample, images.device)


def corrupt(
    images: Tensor,
    name: str,
    severity: int,
    generators: Sequence[torch.Generator] | None = None,
    *,
    draws: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Apply corruption ``name`` at ``severity`` (1..5) to every image of the batch.

    Args:
        images: float (N, 3, H, W) in [0, 1], on CPU or GPU.
        name: a registered corruption (see ``CORRUPTIONS.names()``).
        severity: 1..5, the reference's severity table index.
        generators: one ``torch.Generator`` per sample for the random draws; None uses generators seeded from
            torch's global RNG (not reproducible per sample: pass generators, or use :func:`corrupt_batch`).
        draws: the stacked draws themselves (see :func:`make_draws`), e.g. a reference implementation's draws in
            tests; overrides ``generators``.

    Returns:
        The corrupted images, same shape, dtype and device, in [0, 1].
    """
    check_images(images)
    corruption = CORRUPTIONS.get(name)
    severity = check_severity(severity)
    if draws is None and corruption.draw is not None:
        if generators is None:
            seeds = torch.randint(0, 2**62, (images.shape[0],)).tolist()
            generators = [torch.Generator().manual_seed(s) for s in seeds]
        draws = make_draws(images, name, severity, generators)
    return corruption.apply(images, severity, draws or {})


def corrupt_batch(
    images: Tensor,
    names: Sequence[str],
    severities: Sequence[int],
    seeds: Sequence[int],
    *,
    draw_device: torch.device | str = "cpu",
) -> Tensor:
    """Corrupt each sample with its own corruption, severity and seed.

    Samples sharing a (name, severity) are corrupted together; each sample's draws come from a
    ``torch.Generator`` seeded with its seed, so its output does not depend on the rest of the batch or the worker.

    Args:
        images: float (N, 3, H, W) in [0, 1].
        names: N corruption names.
        severities: N severities in 1..5.
        seeds: N integer seeds, e.g. ``sample_seed(id, epoch, "corruption", run_seed)``.
        draw_device: where the generators live and the draws are made. The default "cpu" gives the same draws
            whatever device the images are on; "cuda" is much faster for GPU batches (no per-sample CPU noise
            fields to copy) but CUDA generators give other draws than CPU ones for the same seed, so results are
            reproducible per draw device only.
    """
    check_images(images)
    n = images.shape[0]
    if not (len(names) == len(severities) == len(seeds) == n):
        raise ValueError(
            f"corrupt_batch needs one name, severity and seed per image: got {len(names)} names, "
            f"{len(severities)} severities and {len(seeds)} seeds for {n} images"
        )
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, (name, severity) in enumerate(zip(names, severities, strict=True)):
        CORRUPTIONS.check(name)
        groups[(name, check_severity(severity))].append(i)
    if len(groups) == 1:  # one corruption for the whole batch: no gather/scatter copies
        (name, severity), _ = next(iter(groups.items()))
        generators = [torch.Generator(device=draw_device).manual_seed(int(seed)) for seed in seeds]
        return corrupt(images, name, severity, generators)
    out = torch.empty_like(images)
    for (name, severity), indices in groups.items():
        index = torch.tensor(indices, device=images.device)
        generators = [torch.Generator(device=draw_device).manual_seed(int(seeds[i])) for i in indices]
        out[index] = corrupt(images.index_select(0, index), name, severity, generators)
    return out
