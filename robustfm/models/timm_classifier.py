"""timm image classifiers behind one wrapper: [0,1] pixels in, logits, pooled features and patch tokens out.

``build_timm_classifier`` is the "timm" family builder of :data:`robustfm.models.MODELS`. timm is imported only when a
model is built.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from robustfm.models.pixels import PixelNormalize
from robustfm.models.tokens import block_indices, check_tokens
from robustfm.models.weights import choose_weights, load_checked_state_dict, strip_prefix
from robustfm.registry import UnknownNameError, did_you_mean

if TYPE_CHECKING:
    from robustfm.models.attention import AttentionAdapter

#: robustfm's tiny timm architectures: robustfm name -> the timm entrypoint registered in robustfm.models.tiny_timm.
TINY_TIMM_ARCHS = {"tiny-vit": "robustfm_tiny_vit"}


@functools.cache
def _timm() -> Any:
    """Import timm once, with robustfm's tiny models registered."""
    import timm

    import robustfm.models.tiny_timm  # noqa: F401  (registers robustfm_tiny_vit with timm)

    return timm


class TimmClassifier(nn.Module):
    """A timm classifier taking [0,1] pixels, normalized inside with its pretrained config's mean/std.

    Patch tokens (:meth:`encode_image_with_tokens`) need a ViT-style model: every entry of timm's ``feature_info``
    with the same width and stride, and ``forward_intermediates`` with ``NLC`` output.

    Args:
        model: the timm model; kept as ``self.model`` (its ``state_dict()`` is a plain timm state dict).
        arch: robustfm's name for the architecture (``tiny-vit``, ``vit_base_patch16_224``).
        pretrained: where the weights came from (None: random init), kept for logs.
    """

    def __init__(self, model: nn.Module, arch: str, pretrained: str | None = None) -> None:
        super().__init__()
        cfg = model.pretrained_cfg
        channels, height, width = cfg["input_size"]
        if channels != 3 or height != width:
            raise ValueError(f"timm/{arch}: only square RGB inputs are supported, got input_size {cfg['input_size']}")
        self.model = model
        self.arch = arch
        self.pretrained = pretrained
        self.image_size = int(height)
        self.num_classes = int(model.num_classes)
        self.embed_dim = int(model.num_features)
        features = model.feature_info
        self.num_blocks = len(features)
        self.width = int(features[-1]["num_chs"])
        stride = int(features[-1]["reduction"])
        self.grid_size = (self.image_size // stride, self.image_size // stride)
        self.has_tokens = all((f["num_chs"], f["reduction"]) == (self.width, stride) for f in features)
        self.pixels = PixelNormalize(cfg["mean"], cfg["std"], self.image_size)

    def _weights_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, num_classes)`` of [0,1] pixels ``(N, 3, S, S)``."""
        return self.model(self.pixels(pixels, self._weights_dtype()))

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Pooled features before the classifier head ``(N, embed_dim)``; unit length when ``normalize``."""
        features = self.model.forward_features(self.pixels(pixels, self._weights_dtype()))
        pooled = self.model.forward_head(features, pre_logits=True)
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def encode_image_with_tokens(
        self, pixels: torch.Tensor, blocks: Sequence[int], normalize: bool = False
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Pooled features and the patch tokens after each of ``blocks`` (1-based) from one forward pass.

        Returns:
            ``(features (N, embed_dim), {block: tokens (N, gh*gw, width)})``: batch-first patch tokens in row-major
            grid order, class and register tokens removed, before the final norm.
        """
        if not self.has_tokens:
            raise ValueError(
                f"timm/{self.arch} is not a ViT-style model (its feature_info stages differ in width or stride): "
                "patch tokens per block are not available"
            )
        indices = block_indices(blocks, self.num_blocks)
        if not indices:
            return self.encode_image(pixels, normalize), {}
        x = self.pixels(pixels, self._weights_dtype())
        final, intermediates = self.model.forward_intermediates(x, indices=indices, norm=False, output_fmt="NLC")
        pooled = self.model.forward_head(final, pre_logits=True)
        tokens = {
            index + 1: check_tokens(t, x.shape[0], self.grid_size, self.width, index + 1)
            for index, t in zip(indices, intermediates, strict=True)
        }
        return (F.normalize(pooled, dim=-1) if normalize else pooled), tokens

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (less memory, more compute)."""
        self.model.set_grad_checkpointing(enable)

    def attention_adapter(self) -> AttentionAdapter:
        """The model's attention for :func:`robustfm.models.attention.attention_taps` (ValueError if it is not a timm
        VisionTransformer with timm Attention blocks)."""
        from robustfm.models.attention_timm import timm_attention_adapter

        return timm_attention_adapter(self)

    def extra_repr(self) -> str:
        return (
            f"arch={self.arch!r}, pretrained={self.pretrained!r}, image_size={self.image_size}, "
            f"num_classes={self.num_classes}, grid_size={self.grid_size}, width={self.width}, "
            f"num_blocks={self.num_blocks}"
        )


def timm_state_dict(model: TimmClassifier) -> dict[str, torch.Tensor]:
    """The plain timm state dict (loadable by ``timm.create_model(..., pretrained_cfg_overlay=dict(file=path))``)."""
    return model.model.state_dict()


def load_timm_state_dict(model: TimmClassifier, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a bare timm state dict or a :class:`TimmClassifier` state dict (``model.`` keys) into ``model``."""
    load_checked_state_dict(model.model, strip_prefix(state, "model."), source)


def build_timm_classifier(arch: str, pretrained: str | None = None) -> TimmClassifier:
    """Build ``timm/<arch>``: random init (``pretrained=None``), a local weights file, or a timm pretrained tag
    (``timm/vit_base_patch16_224`` with ``pretrained="augreg2_in21k_ft_in1k"``)."""
    timm = _timm()
    name = f"timm/{arch}"
    timm_arch = TINY_TIMM_ARCHS.get(arch, arch)
    base, dot, tag_in_name = arch.partition(".")
    if dot:
        raise ValueError(
            f"model name {name!r}: give the tag separately, e.g. model.name=timm/{base} model.pretrained={tag_in_name}"
        )
    known = timm.list_models()
    if timm_arch not in known:
        raise UnknownNameError(
            f"unknown timm architecture {arch!r}{did_you_mean(arch, known + list(TINY_TIMM_ARCHS))} "
            f"({len(known)} known: see timm.list_models(); robustfm's tiny ones: {', '.join(TINY_TIMM_ARCHS)})"
        )
    choice = choose_weights(name, pretrained, [n.partition(".")[2] for n in timm.list_pretrained(f"{timm_arch}.*")])
    if choice.tag is None:
        model = TimmClassifier(timm.create_model(timm_arch, pretrained=False), arch, pretrained)
        if choice.file is not None:
            load_timm_state_dict(model, choice.state_dict(), source=choice.file)
        return model
    try:
        backbone = timm.create_model(f"{timm_arch}.{choice.tag}", pretrained=True)
    except OSError as error:  # hub errors (offline mode, DNS, HTTP, missing cache entry) are all OSErrors
        raise choice.unavailable(error) from error
    return TimmClassifier(backbone, arch, pretrained)
