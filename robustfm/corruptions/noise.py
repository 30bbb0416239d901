"""Noise corruptions: gaussian, shot (Poisson), impulse (salt and pepper) and speckle noise.

Parameters are ``imagecorruptions`` 1.1.2's. Draws are whole noise fields of the image's shape (3, H, W), one
independent value per pixel and channel, as in the reference. Shot noise draws the Poisson counts themselves (they
depend on the image); impulse noise draws one uniform per value that decides salt (1), pepper (0) or unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from robustfm.corruptions.base import register_corruption

GAUSSIAN_NOISE_STD = (0.08, 0.12, 0.18, 0.26, 0.38)
SHOT_NOISE_PHOTONS = (60, 25, 12, 5, 3)
IMPULSE_NOISE_AMOUNT = (0.03, 0.06, 0.09, 0.17, 0.27)
SPECKLE_NOISE_STD = (0.15, 0.2, 0.35, 0.45, 0.6)


def _normal_field(image: Tensor, severity: int, generator: torch.Generator) -> dict[str, Tensor]:
    noise = torch.randn(image.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return {"noise": noise}


@register_corruption("gaussian_noise", GAUSSIAN_NOISE_STD, draw=_normal_field, kind="noise")
def gaussian_noise(images: Tensor, severity: int, draws: Mapping[str, Tensor]) -> Tensor:
    """Additive N(0, std^2) noise; ``draws["noise"]`` is standard normal (N, 3, H, W)."""
    std = GAUSSIAN_NOISE_STD[severity - 1]
    return torch.add(images, draws["noise"].to(images.dtype), alpha=std).clamp_(0, 1)


def _poisson_counts(image: Tensor, severity: int, generator: torch.Generator) -> dict[str, Tensor]:
    photons = SHOT_NOISE_PHOTONS[severity - 1]
    rates = image.detach().to(device=generator.device, dtype=torch.float32).clamp(0, 1) * photons
    return {"counts": torch.poisson(rates, generator=generator)}


@register_corruption("shot_noise", SHOT_NOISE_PHOTONS, draw=_poisson_counts, kind="noise")
def shot_noise(images: Tensor, severity: int, draws: Mapping[str, Tensor]) -> Tensor:
    """Poisson photon noise: ``counts ~ Poisson(x * photons)``, output ``counts / photons``."""
    return (draws["counts"].to(images.dtype) / SHOT_NOISE_PHOTONS[severity - 1]).clamp(0, 1)


def _salt_and_pepper(image: Tensor, severity: int, generator: torch.Generator) -> dict[str, Tensor]:
    return {"u": torch.rand(image.shape, generator=generator, device=generator.device)}


@register_corruption("impulse_noise", IMPULSE_NOISE_AMOUNT, draw=_salt_and_pepper, kind="noise")
def impulse_noise(images: Tensor, severity: int, draws: Mapping[str, Tensor]) -> Tensor:
    """Salt and pepper: each value flips with probability ``amount``, to 1 or 0 with equal odds.

    skimage's random_noise(mode="s&p") draws the flip and the salt/pepper choice separately; one uniform ``u`` per
    value gives the same law: ``u < amount / 2`` is salt, ``amount / 2 <= u < amount`` is pepper.
    """
    amount = IMPULSE_NOISE_AMOUNT[severity - 1]
    u = draws["u"]
    out = images.masked_fill(u < amount / 2, 1.0)
    return out.masked_fill((u >= amount / 2) & (u < amount), 0.0)


@register_corruption("speckle_noise", SPECKLE_NOISE_STD, draw=_normal_field, kind="noise")
def speckle_noise(images: Tensor, severity: int, draws: Mapping[str, Tensor]) -> Tensor:
    """Multiplicative noise ``x + x * N(0, std^2)``."""
    std = SPECKLE_NOISE_STD[severity - 1]
    return torch.addcmul(images, images, draws["noise"].to(images.dtype), value=std).clamp_(0, 1)
