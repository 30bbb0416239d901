"""``create_model("family/arch", pretrained)``: one entry point for open_clip CLIP models and timm classifiers.

The family before the ``/`` picks a builder from :data:`MODELS`; the builder checks the architecture against its
library's own list (``open_clip.list_models()``, ``timm.list_models()``) and robustfm's tiny registered configs.
Listing families and tiny models imports neither library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from robustfm.registry import Registry

if TYPE_CHECKING:
    from robustfm.models.clip import ClipModel
    from robustfm.models.timm_classifier import TimmClassifier

#: Model families: name -> builder ``(arch, pretrained) -> nn.Module``. Meta ``tiny`` lists the tiny ViT architectures
#: robustfm registers with that library (usable offline, random init or local weights; with patch tokens), meta
#: ``tiny_conv`` the tiny convolutional ones (embeddings only: no patch tokens, no attention).
MODELS: Registry = Registry("model family")
MODELS.register_lazy(
    "open_clip",
    "robustfm.models.clip:build_clip_model",
    tiny=("tiny-vit",),
    tiny_conv=("tiny-convnext",),
    returns="ClipModel",
    library="open_clip",
)
MODELS.register_lazy(
    "timm",
    "robustfm.models.timm_classifier:build_timm_classifier",
    tiny=("tiny-vit",),
    returns="TimmClassifier",
    library="timm",
)
MODELS.register_lazy(
    "lpips",
    "robustfm.models.lpips_metric:build_lpips",
    tiny=(),
    returns="LpipsMetric",
    library="lpips",
)

#: Every tiny ViT of every family, as full names (``open_clip/tiny-vit``, ``timm/tiny-vit``); token and attention
#: tests iterate these.
TINY_MODELS: tuple[str, ...] = tuple(
    f"{family}/{arch}" for family in MODELS.names() for arch in MODELS.meta(family)["tiny"]
)
#: The tiny convolutional models (``open_clip/tiny-convnext``): embeddings only, for paper 003's ConvNeXt path.
TINY_CONV_MODELS: tuple[str, ...] = tuple(
    f"{family}/{arch}" for family in MODELS.names() for arch in MODELS.meta(family).get("tiny_conv", ())
)


def split_model_name(name: str) -> tuple[str, str]:
    """``"open_clip/ViT-B-32"`` -> ``("open_clip", "ViT-B-32")``; the family must be registered in :data:`MODELS`."""
    family, sep, arch = name.partition("/")
    if not sep or not family or not arch:
        raise ValueError(
            f"model name {name!r} must look like 'family/arch' with family one of {', '.join(MODELS.names())} "
            f"(e.g. open_clip/ViT-B-32, timm/vit_base_patch16_224, {', '.join(TINY_MODELS)})"
        )
    MODELS.check(family)
    return family, arch


def create_model(name: str, pretrained: str | None = None) -> ClipModel | TimmClassifier:
    """Build a model that takes float [0,1] RGB pixels ``(N, 3, S, S)`` and normalizes them inside.

    Args:
        name: ``family/arch``: ``open_clip/ViT-B-32``, ``timm/vit_base_patch16_224``, ``open_clip/tiny-vit``,
            ``timm/tiny-vit``, ``open_clip/convnext_base_w:224`` (open_clip: ``:<size>`` runs a convolutional tower
            at another input size). An unknown family or architecture raises with a "did you mean".
        pretrained: None for random init; a local weights path (``.safetensors``, or a torch checkpoint loaded with
            ``weights_only=True``; a bare open_clip/timm state dict or one saved from robustfm's wrapper); or a
            pretrained tag of the library (``openai``; needs internet, else ``PretrainedUnavailableError``).

    Returns:
        A :class:`~robustfm.models.clip.ClipModel` (open_clip) or a
        :class:`~robustfm.models.timm_classifier.TimmClassifier` (timm), in fp32 on the CPU.
    """
    family, arch = split_model_name(name)
    return MODELS.get(family)(arch, pretrained)
