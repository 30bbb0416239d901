"""open_clip models behind one wrapper: [0,1] pixels in, embeddings and intermediate patch tokens out.

``build_clip_model`` is the "open_clip" family builder of :data:`robustfm.models.MODELS`. open_clip is imported only
when a model is built, so importing this module (e.g. for ``ClipModel`` type hints) stays light.

Any open_clip image tower embeds images; patch tokens and attention exist for ViT towers only (a ConvNeXt tower such
as ``convnext_base_w``, paper 003's main backbone, raises :class:`TokensUnavailableError` naming its architecture).

An image-size override is part of the architecture name: ``open_clip/convnext_base_w:224`` is ``convnext_base_w``
(native 256 px) run at 224 px, as paper 003 evaluates it. The name is what configs, evaluation references
(``open_clip/convnext_base_w:224@laion2b_s13b_b82k_augreg``) and exported files carry, so the size travels with the
model everywhere. It is allowed only for towers whose weights do not depend on the input size (timm convolutional
towers); a ViT's position embeddings are sized for its native resolution.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
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

#: JSON architecture configs shipped with robustfm, registered with open_clip like its own (``add_model_config``).
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
#: open_clip ViT architectures robustfm ships (tests and the CPU demo use them through the same factory as ViT-B-32).
TINY_CLIP_ARCHS = ("tiny-vit",)
#: robustfm's tiny open_clip architectures without patch tokens: a timm ConvNeXt tower (``test_convnext``, random
#: init), the CPU stand-in for paper 003's ``convnext_base_w``.
TINY_CLIP_CONV_ARCHS = ("tiny-convnext",)
#: Separates an architecture from its image-size override in a model name (``convnext_base_w:224``).
IMAGE_SIZE_SEPARATOR = ":"
# open_clip keeps these as 0-dim parameters; DeepSpeed cannot broadcast/partition 0-dim parameters, so the wrapper
# holds them as shape [1] and puts the original shape back on export.
_SCALAR_PARAMETERS = ("logit_scale", "logit_bias")


@functools.cache
def _open_clip() -> Any:
    """Import open_clip once and register robustfm's JSON configs with it."""
    import open_clip

    open_clip.add_model_config(MODEL_CONFIG_DIR)
    return open_clip


class TokensUnavailableError(ValueError):
    """Patch tokens or attention asked of an image tower that has none (a convolutional tower)."""


class ClipModel(nn.Module):
    """An open_clip CLIP model taking [0,1] pixels, with access to the patch tokens after chosen blocks (ViT towers).

    Args:
        clip: the open_clip model (``CLIP`` or ``CustomTextCLIP``); kept as ``self.clip`` (export it with
            :func:`open_clip_state_dict`). Its 0-dim ``logit_scale`` (and ``logit_bias``) are replaced in place by
            shape-[1] parameters with the same values.
        tokenizer: open_clip tokenizer of the architecture (callable: list of str -> LongTensor).
        arch: open_clip architecture name (``ViT-B-32``, ``tiny-vit``, ``convnext_base_w``).
        mean: per-channel mean of the model's preprocessing config.
        std: per-channel standard deviation of the model's preprocessing config.
        pretrained: where the weights came from (None: random init), kept for logs.
        image_size: side of the inputs (None: the tower's own ``image_size``); see :func:`build_clip_model`.
        embed_dim: width of the joint embedding (None: the image tower's ``output_dim``, which timm towers lack).
    """

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Callable[..., torch.Tensor],
        arch: str,
        mean: Sequence[float],
        std: Sequence[float],
        pretrained: str | None = None,
        image_size: int | None = None,
        embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        visual = clip.visual
        height, width = _pair(visual.image_size)
        if height != width:
            raise ValueError(f"open_clip/{arch}: only square inputs are supported, got image size {visual.image_size}")
        self.clip = clip
        self.tokenizer = tokenizer
        self.arch = arch
        self.pretrained = pretrained
        self.image_size = int(image_size or height)
        self.image_tower = _tower_name(visual)
        """The image tower's kind, for messages: ``VisionTransformer`` or ``TimmModel(convnext_base)``."""
        self.has_tokens = isinstance(visual, _open_clip().transformer.VisionTransformer)
        """Whether patch tokens and attention exist (ViT towers)."""
        if self.has_tokens:
            self._grid_size = (int(visual.grid_size[0]), int(visual.grid_size[1]))
            self._width = int(visual.transformer.width)
            self._num_blocks = len(visual.transformer.resblocks)
        # open_clip's ViT and ResNet towers know their output width; a timm tower's is the model config's embed_dim.
        self.embed_dim = int(embed_dim if embed_dim is not None else visual.output_dim)
        self.pixels = PixelNormalize(mean, std, self.image_size)

        own_parameters = dict(clip.named_parameters(recurse=False))
        self._export_shapes: dict[str, torch.Size] = {}
        for name in _SCALAR_PARAMETERS:
            parameter = own_parameters.get(name)
            if parameter is not None:
                self._export_shapes[name] = parameter.shape
                setattr(clip, name, nn.Parameter(parameter.detach().reshape(1).clone(), parameter.requires_grad))

    @property
    def logit_scale(self) -> nn.Parameter:
        """Log of the contrastive temperature's inverse, shape [1]; the same parameter the open_clip model uses."""
        return self.clip.logit_scale

    def _no_tokens(self, what: str) -> TokensUnavailableError:
        return TokensUnavailableError(
            f"open_clip/{self.arch} has a {self.image_tower} image tower: it has no patch tokens, so {what} is not "
            "available (it needs a ViT image tower); encode_image works on every tower"
        )

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid ``(gh, gw)`` of the ViT image tower."""
        if not self.has_tokens:
            raise self._no_tokens("grid_size")
        return self._grid_size

    @property
    def width(self) -> int:
        """Token width of the ViT image tower."""
        if not self.has_tokens:
            raise self._no_tokens("width")
        return self._width

    @property
    def num_blocks(self) -> int:
        """Transformer blocks of the ViT image tower."""
        if not self.has_tokens:
            raise self._no_tokens("num_blocks")
        return self._num_blocks

    def _weights_dtype(self) -> torch.dtype:
        return next(self.clip.visual.parameters()).dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image embeddings (not normalized) of [0,1] pixels; same as :meth:`encode_image`."""
        return self.encode_image(pixels)

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Image embeddings ``(N, embed_dim)`` of [0,1] pixels ``(N, 3, S, S)``; unit length when ``normalize``."""
        return self.clip.encode_image(self.pixels(pixels, self._weights_dtype()), normalize=normalize)

    def encode_image_with_tokens(
        self, pixels: torch.Tensor, blocks: Sequence[int], normalize: bool = False
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Image embeddings and the patch tokens after each of ``blocks`` from one forward pass.

        Args:
            pixels: [0,1] pixels ``(N, 3, S, S)``.
            blocks: 1-based transformer blocks (1..num_blocks); block b means the residual stream after block b.
            normalize: return unit-length embeddings.

        Returns:
            ``(embeddings (N, embed_dim), {block: tokens (N, gh*gw, width)})``: batch-first patch tokens in row-major
            grid order, the class token removed, before any final norm.

        Raises:
            TokensUnavailableError: the image tower is not a ViT.
        """
        if not self.has_tokens:
            raise self._no_tokens("encode_image_with_tokens")
        indices = block_indices(blocks, self.num_blocks)
        if not indices:
            return self.encode_image(pixels, normalize), {}
        x = self.pixels(pixels, self._weights_dtype())
        out = self.clip.visual.forward_intermediates(x, indices=indices, output_fmt="NLC")
        features = out["image_features"]
        tokens = {
            index + 1: check_tokens(t, x.shape[0], self.grid_size, self.width, index + 1)
            for index, t in zip(indices, out["image_intermediates"], strict=True)
        }
        return (F.normalize(features, dim=-1) if normalize else features), tokens

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids ``(N, context_length)`` (LongTensor, CPU) with the architecture's own tokenizer."""
        if isinstance(texts, str):
            raise TypeError("tokenize takes a sequence of strings, not one string")
        return self.tokenizer(list(texts))

    def encode_text(self, texts: Sequence[str] | torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text embeddings ``(N, embed_dim)`` of strings or of token ids from :meth:`tokenize`."""
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        return self.clip.encode_text(tokens.to(self.logit_scale.device), normalize=normalize)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass of both towers (less memory, ~30% more compute)."""
        self.clip.set_grad_checkpointing(enable)

    def attention_adapter(self) -> AttentionAdapter:
        """The image tower's attention for :func:`robustfm.models.attention.attention_taps` (ValueError if not a ViT
        of open_clip ResidualAttentionBlocks; :class:`TokensUnavailableError`, a ValueError, for other towers)."""
        if not self.has_tokens:
            raise self._no_tokens("attention_adapter")
        from robustfm.models.attention_openclip import openclip_attention_adapter

        return openclip_attention_adapter(self)

    def image_parameters(self) -> list[nn.Parameter]:
        """Parameters of the image tower."""
        return list(self.clip.visual.parameters())

    def text_parameters(self) -> list[nn.Parameter]:
        """Every other parameter: the text tower, ``logit_scale`` (and ``logit_bias`` where the model has one)."""
        image = {id(p) for p in self.clip.visual.parameters()}
        return [p for p in self.clip.parameters() if id(p) not in image]

    def extra_repr(self) -> str:
        tokens = (
            f"grid_size={self.grid_size}, width={self.width}, num_blocks={self.num_blocks}, "
            if self.has_tokens
            else f"image_tower={self.image_tower!r}, "
        )
        return (
            f"arch={self.arch!r}, pretrained={self.pretrained!r}, image_size={self.image_size}, {tokens}"
            f"embed_dim={self.embed_dim}"
        )


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _tower_name(visual: nn.Module) -> str:
    trunk = getattr(visual, "trunk", None)  # open_clip's TimmModel keeps the timm network as ``trunk``
    if trunk is None:
        return type(visual).__name__
    return f"{type(visual).__name__}({getattr(trunk, 'default_cfg', {}).get('architecture', type(trunk).__name__)})"


def split_image_size(arch: str) -> tuple[str, int | None]:
    """``"convnext_base_w:224"`` -> ``("convnext_base_w", 224)``; ``"ViT-B-32"`` -> ``("ViT-B-32", None)``."""
    base, separator, size = arch.partition(IMAGE_SIZE_SEPARATOR)
    if not separator:
        return arch, None
    if not size.isdigit() or int(size) < 16:
        raise ValueError(
            f"open_clip/{arch}: the image-size override after {IMAGE_SIZE_SEPARATOR!r} must be an integer >= 16 "
            f"(e.g. open_clip/convnext_base_w{IMAGE_SIZE_SEPARATOR}224), got {size!r}"
        )
    return base, int(size)


def _check_resizable(clip: nn.Module, name: str, size: int) -> None:
    """Refuse an image-size override for a tower with size-bound weights (ViT position embeddings, ResNet attention
    pooling); a timm tower is told its new size and must keep every parameter shape."""
    visual = clip.visual
    native = _pair(visual.image_size)[0]
    if size == native:
        return
    if not isinstance(visual, _open_clip().timm_model.TimmModel):
        raise ValueError(
            f"{name}: its {_tower_name(visual)} image tower has weights sized for {native} px inputs (position "
            f"embeddings), so it cannot run at {size} px; an image-size override needs a timm convolutional tower "
            "(e.g. open_clip/convnext_base_w:224)"
        )
    shapes = {key: tuple(value.shape) for key, value in visual.state_dict().items()}
    visual.set_input_size(size)
    changed = [key for key, value in visual.state_dict().items() if shapes.get(key) != tuple(value.shape)]
    if changed:
        raise ValueError(f"{name}: running at {size} px changes the shape of {changed[:3]}; not supported")


def open_clip_state_dict(model: ClipModel) -> dict[str, torch.Tensor]:
    """The state dict of ``model.clip`` as open_clip saves it (0-dim ``logit_scale``), loadable by
    ``open_clip.create_model(arch, pretrained=path)``."""
    state = model.clip.state_dict()
    for name, shape in model._export_shapes.items():
        state[name] = state[name].reshape(shape)
    return state


def load_clip_state_dict(model: ClipModel, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a bare open_clip state dict or a :class:`ClipModel` state dict (``clip.`` keys) into ``model``, strictly."""
    state = strip_prefix(state, "clip.")
    for name in model._export_shapes:
        if name in state and state[name].numel() == 1:
            state[name] = state[name].reshape(1)
    load_checked_state_dict(model.clip, state, source)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _without_random_init_warning() -> Iterator[None]:
    """open_clip warns on the root logger when it builds without weights; here that is what was asked for (random
    init, or weights loaded right after from a local file), so the warning would only alarm the reader."""
    root, drop = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def build_clip_model(arch: str, pretrained: str | None = None) -> ClipModel:
    """Build ``open_clip/<arch>``: random init (``pretrained=None``), a local weights file, or a pretrained tag.

    ``arch`` may end with an image-size override, ``convnext_base_w:224`` (see the module docstring).
    A tag's weights are fetched first, so that an offline machine fails at once with
    :class:`~robustfm.models.weights.PretrainedUnavailableError` instead of inside model construction.
    """
    open_clip = _open_clip()
    name = f"open_clip/{arch}"
    arch, image_size = split_image_size(arch)
    known = open_clip.list_models()
    if arch not in known:
        raise UnknownNameError(
            f"unknown open_clip architecture {arch!r}{did_you_mean(arch, known)} ({len(known)} known: see "
            f"open_clip.list_models(); robustfm's tiny ones: {', '.join(TINY_CLIP_ARCHS + TINY_CLIP_CONV_ARCHS)})"
        )
    choice = choose_weights(name, pretrained, open_clip.list_pretrained_tags_by_model(arch))
    if choice.tag is None:
        with _without_random_init_warning():
            clip = open_clip.create_model(arch, pretrained=None)
    else:
        tag_cfg = open_clip.get_pretrained_cfg(arch, choice.tag)
        try:
            open_clip.download_pretrained(tag_cfg)
        except Exception as error:  # the hub client raises many types (offline mode, HTTP, DNS); all mean unavailable
            raise choice.unavailable(error) from error
        # Tags trained with QuickGELU (OpenAI's) give wrong features on a GELU graph; follow the tag's own config.
        clip = open_clip.create_model(arch, pretrained=choice.tag, force_quick_gelu=bool(tag_cfg.get("quick_gelu")))
    if image_size is not None:
        _check_resizable(clip, name, image_size)
    preprocess = open_clip.get_model_preprocess_cfg(clip)
    model = ClipModel(
        clip,
        open_clip.get_tokenizer(arch),
        arch,
        preprocess["mean"],
        preprocess["std"],
        pretrained=pretrained,
        image_size=image_size,
        embed_dim=open_clip.get_model_config(arch)["embed_dim"],
    )
    if choice.file is not None:
        load_clip_state_dict(model, choice.state_dict(), source=choice.file)
    return model
