"""The two perturbation registries, and the checks shared by every entry.

Each entry is a function ``fn(images, value, generators) -> images`` on float32 [0,1] batches (N, 3, H, W), where
``value`` is one scalar parameter and ``generators`` is ``None`` or one :class:`torch.Generator` per image (only
random edits read it). Its meta records the documented parameter range and the identity point:

- ``low`` / ``high``: the range that :func:`robustfm.perturbations.sweep` samples, ``low`` first;
- ``identity``: the value that gives the input back (exactly, or within ``identity_atol`` for lossy round trips);
- ``description``: what the parameter means, in words, with its unit.
"""

from __future__ import annotations

from collections.abc import Callable

from robustfm.registry import Registry, UnknownNameError, did_you_mean

PERTURBATIONS: Registry[Callable] = Registry("perturbation")
"""Everyday photometric edits (paper 004): JPEG quality, brightness, contrast, saturation, hue, sharpness,
Gaussian noise, Gaussian blur, downscale-upscale."""

GEOMETRIC_VARIANTS: Registry[Callable] = Registry("geometric variant")
"""COVAR-style viewpoint variants (paper 002): flips, translation, centre crop, rotation, scale."""


def register_edit(
    registry: Registry,
    name: str,
    *,
    low: float,
    high: float,
    identity: float,
    description: str,
    identity_atol: float = 1e-5,
    random: bool = False,
) -> Callable[[Callable], Callable]:
    """Register an edit with its documented range; checks that the meta is coherent at import time."""
    if not low < high:
        raise ValueError(f"{registry.family} {name!r}: low ({low}) must be below high ({high})")
    return registry.register(
        name,
        low=float(low),
        high=float(high),
        identity=float(identity),
        description=description,
        identity_atol=float(identity_atol),
        random=random,
    )


def lookup(name: str) -> tuple[Registry, Callable]:
    """Find ``name`` in either registry (their names are disjoint); unknown names list both families."""
    for registry in (PERTURBATIONS, GEOMETRIC_VARIANTS):
        if name in registry:
            return registry, registry.get(name)
    known = PERTURBATIONS.names() + GEOMETRIC_VARIANTS.names()
    raise UnknownNameError(
        f"unknown perturbation or geometric variant {name!r}{did_you_mean(name, known)} "
        f"(registered: {', '.join(known)})"
    )
