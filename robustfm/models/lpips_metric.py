"""LPIPS (Zhang et al. 2018) as a model robustfm can score: ``lpips/alex``, ``lpips/vgg``, ``lpips/squeeze`` (an
optional ``:<size>`` sets the side images are decoded to; default 64, BAPPS' native size).

LPIPS is a distance between two images, not an embedding: the model has ``pair_distance(a, b)`` on [0,1] pixels and
no ``encode_image`` (suites that compare pairs, ``two_afc``, use the distance; the others refuse it by name). Its
learned linear heads ship in the ``lpips`` wheel and load here with ``weights_only=True``; the trunk (AlexNet, VGG-16,
SqueezeNet) is torchvision's ImageNet network, which needs a download: ``pretrained=None`` keeps the trunk random
(what runs offline; the numbers are then not LPIPS's), ``pretrained="torchvision"`` downloads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustfm.models.weights import PretrainedUnavailableError
from robustfm.registry import UnknownNameError, did_you_mean

LPIPS_NETS = ("alex", "vgg", "squeeze")
DEFAULT_SIZE = 64


class LpipsMetric(nn.Module):
    """LPIPS v0.1 on [0,1] pixels; ``pair_distance`` gives one distance per pair of images."""

    def __init__(self, metric: nn.Module, arch: str, pretrained: str | None, image_size: int) -> None:
        super().__init__()
        self.metric = metric
        self.arch = arch
        self.pretrained = pretrained
        self.image_size = image_size

    def pair_distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``(N,)`` LPIPS distances between the rows of ``a`` and ``b`` (``(N, 3, S, S)`` in [0, 1])."""
        return self.metric(a * 2 - 1, b * 2 - 1).flatten()  # LPIPS expects [-1, 1]

    def encode_image(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise TypeError(
            f"lpips/{self.arch} is a distance between two images, not an embedding model: use it with suites that "
            "compare pairs of images (two_afc)"
        )


def build_lpips(arch: str, pretrained: str | None = None) -> LpipsMetric:
    """Build ``lpips/<net>[:<size>]`` (see the module docstring)."""
    import lpips

    net, _, size_text = arch.partition(":")
    if net not in LPIPS_NETS:
        raise UnknownNameError(f"unknown LPIPS network {net!r}{did_you_mean(net, LPIPS_NETS)} (one of {LPIPS_NETS})")
    if size_text and not (size_text.isdigit() and int(size_text) >= 16):
        raise ValueError(f"model name lpips/{arch}: the size after ':' must be an integer >= 16, got {size_text!r}")
    if pretrained not in (None, "torchvision"):
        raise ValueError(f"lpips/{arch}: pretrained must be null (random trunk) or 'torchvision', got {pretrained!r}")
    try:
        metric = lpips.LPIPS(net=net, pretrained=False, pnet_rand=pretrained is None, verbose=False)
    except OSError as error:  # the torchvision trunk could not be downloaded
        raise PretrainedUnavailableError(
            f"lpips/{arch}: torchvision's ImageNet {net} trunk could not be downloaded ({error}); use pretrained=null "
            "for a random trunk offline"
        ) from error
    heads = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    state = torch.load(heads, map_location="cpu", weights_only=True)
    # strict=False: the file holds the heads only (lin0..lin4; ``lins`` aliases them), not the trunk.
    result = metric.load_state_dict(state, strict=False)
    if result.unexpected_keys or not state:
        raise RuntimeError(f"lpips/{arch}: the linear heads in {heads} do not fit ({result})")
    return LpipsMetric(metric.eval(), arch, pretrained, int(size_text) if size_text else DEFAULT_SIZE)
