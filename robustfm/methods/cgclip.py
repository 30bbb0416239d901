"""CG-CLIP (paper 000): a CLIP model with a corruption decoder, and the task that trains it.

:class:`CGClipModel` is a :class:`~robustfm.models.clip.ClipModel` plus a
:class:`~robustfm.models.corruption_decoder.CorruptionDecoder` on the patch tokens of three of its blocks.
:class:`CGClipTask` implements the engine's Task protocol: ``forward(batch)`` returns the unweighted losses
``{"contrastive": eq. 2, "corruption": eq. 3}`` and ``param_groups()`` the groups ``image_encoder``,
``text_encoder`` and ``decoder`` that the three stages (Adapt, Isolate, Tune) train with their own learning rates.

A batch holds ``image`` (N clean images), ``corrupted`` (their N corrupted versions) and ``map`` (the N ground-truth
corruption maps of the corrupted images, in [0, 1]). Both losses use the concatenated ``[clean; corrupted]`` batch of
``B = 2N`` images (section 3.3), encoded once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from robustfm.config import ConfigError, ModelConfig
from robustfm.methods.cgclip_config import CGClipConfig
from robustfm.methods.losses import contrastive_loss, corruption_map_loss
from robustfm.models.clip import ClipModel
from robustfm.models.corruption_decoder import DEFAULT_DECODER_CHANNELS, CorruptionDecoder, decoder_tap_blocks
from robustfm.train.task import StageSpec, refuse_stage_settings

CGCLIP_LOSSES = ("contrastive", "corruption")
CGCLIP_PARAM_GROUPS = ("image_encoder", "text_encoder", "decoder")
MAX_LOGIT_SCALE = 100.0  # CLIP clamps 1/tau at 100 so that the logits cannot blow up


class CGClipModel(nn.Module):
    """A CLIP model whose image tower also feeds a corruption decoder.

    Args:
        clip: the CLIP backbone (``robustfm.models.create_model("open_clip/...")``).
        decoder_channels: channels of the decoder's upsampling stages.
        tap_blocks: 1-based blocks read by the decoder, shallow to deep; None spreads them proportionally
            (:func:`~robustfm.models.corruption_decoder.decoder_tap_blocks`).
    """

    def __init__(
        self,
        clip: ClipModel,
        decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS,
        tap_blocks: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.clip = clip
        if tap_blocks is None:
            tap_blocks = decoder_tap_blocks(clip.num_blocks, len(decoder_channels))
        self.tap_blocks = tuple(int(b) for b in tap_blocks)
        if len(self.tap_blocks) != len(decoder_channels):
            raise ValueError(
                f"tap_blocks {self.tap_blocks} must name one block per decoder stage {tuple(decoder_channels)}"
            )
        in_range = all(1 <= b <= clip.num_blocks for b in self.tap_blocks)
        if not in_range or list(self.tap_blocks) != sorted(set(self.tap_blocks)):
            raise ValueError(
                f"tap_blocks {self.tap_blocks} must be increasing, distinct block numbers in 1..{clip.num_blocks}"
            )
        self.decoder = CorruptionDecoder(clip.width, clip.grid_size, decoder_channels)

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Image embeddings ``(N, E)`` of ``pixels`` in [0, 1]; the decoder is not run."""
        return self.clip.encode_image(pixels, normalize=normalize)

    def encode_image_and_map(self, pixels: torch.Tensor, normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One image-tower pass giving the embeddings ``(N, E)`` and the corruption logits ``(N, 1, H, W)``."""
        embeddings, tokens = self.clip.encode_image_with_tokens(pixels, self.tap_blocks, normalize=normalize)
        logits = self.decoder([tokens[b] for b in self.tap_blocks], output_size=tuple(pixels.shape[-2:]))
        return embeddings, logits

    def predict_map(self, pixels: torch.Tensor) -> torch.Tensor:
        """Predicted corruption map in [0, 1], ``(N, 1, H, W)``."""
        return torch.sigmoid(self.encode_image_and_map(pixels)[1])


class CGClipTask(nn.Module):
    """CG-CLIP's losses on ``{"image", "corrupted", "map"}`` batches (the engine's Task protocol).

    ``active_losses`` (recorded by :meth:`configure_stage`, which the engine calls before each stage) names the losses
    to compute: without ``corruption`` the decoder is not run at all (Adapt), without ``contrastive`` the text tower
    is not run (Isolate).

    Args:
        model: the CLIP backbone with its decoder.
        config: the method section (prompts, contrastive targets, temperature handling).
    """

    def __init__(self, model: CGClipModel, config: CGClipConfig | None = None) -> None:
        super().__init__()
        self.model = model
        self.config = config or CGClipConfig()
        self.active_losses: frozenset[str] = frozenset(CGCLIP_LOSSES)
        prompts = list(self.config.clean_prompts) + list(self.config.corrupt_prompts)
        # Tokenized once; a non-persistent buffer so it follows the task to its device and stays out of checkpoints.
        self.register_buffer("prompt_tokens", model.clip.tokenize(prompts), persistent=False)
        if self.config.logit_scale_init is not None:
            with torch.no_grad():
                model.clip.logit_scale.fill_(math.log(self.config.logit_scale_init))

    needs: frozenset[str] = frozenset()  # one plain backward: every strategy trains it

    def configure_stage(self, stage: StageSpec) -> None:
        """Record the stage's active losses; CG-CLIP has no per-stage settings.

        Raises:
            ConfigError: for a stage setting, or a weighted loss that CG-CLIP does not compute.
        """
        refuse_stage_settings(stage, "cgclip")
        unknown = sorted(stage.active_losses - set(CGCLIP_LOSSES))
        if unknown:
            raise ConfigError(f"stages.{stage.name}.loss_weights", f"{unknown} are not CG-CLIP losses {CGCLIP_LOSSES}")
        self.active_losses = stage.active_losses

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """``image_encoder`` and ``text_encoder`` (with the temperature) of CLIP, and the ``decoder``."""
        return {
            "image_encoder": list(self.model.clip.image_parameters()),
            "text_encoder": list(self.model.clip.text_parameters()),
            "decoder": list(self.model.decoder.parameters()),
        }

    def logit_scale(self) -> torch.Tensor:
        """The multiplier ``1/tau`` of eq. 2 (learned with the text tower; detached when the config fixes it)."""
        # No clamp here: at the OpenAI init exp(log 100) rounds to 100.0000076 in float32, and a clamp at 100 would
        # pass no gradient at all. The parameter is clamped after each optimizer step instead, as open_clip does.
        scale = self.model.clip.logit_scale.exp()
        return scale.detach() if self.config.logit_scale == "fixed" else scale

    def after_optimizer_step(self) -> None:
        """Keep ``1/tau`` at most 100 (CLIP's bound, so the logits cannot blow up)."""
        with torch.no_grad():
            self.model.clip.logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))

    def caption_indices(self, num_clean: int, num_corrupted: int, device: torch.device | None = None) -> torch.Tensor:
        """Index into ``clean_prompts + corrupt_prompts`` of each image of a ``[clean; corrupted]`` batch: image ``i``
        of a kind gets that kind's prompt ``i mod len``."""
        num_clean_prompts = len(self.config.clean_prompts)
        clean = torch.arange(num_clean, device=device) % num_clean_prompts
        corrupt = num_clean_prompts + torch.arange(num_corrupted, device=device) % len(self.config.corrupt_prompts)
        return torch.cat([clean, corrupt])

    def caption_texts(self, num_clean: int, num_corrupted: int) -> list[str]:
        """The caption of each image of a ``[clean; corrupted]`` batch (see :meth:`caption_indices`)."""
        prompts = list(self.config.clean_prompts) + list(self.config.corrupt_prompts)
        return [prompts[i] for i in self.caption_indices(num_clean, num_corrupted).tolist()]

    def _contrastive(self, image_embeddings: torch.Tensor, num_clean: int) -> torch.Tensor:
        device = image_embeddings.device
        num_corrupted = image_embeddings.shape[0] - num_clean
        # Each distinct prompt is encoded once and gathered per image: the same gradients as encoding 2N captions.
        prompt_embeddings = self.model.clip.encode_text(self.prompt_tokens, normalize=True)
        text_embeddings = prompt_embeddings[self.caption_indices(num_clean, num_corrupted, device)]
        # All prompts of one kind are paraphrases of one caption: the positives of a pair are its kind.
        kinds = torch.cat(
            [
                torch.zeros(num_clean, dtype=torch.long, device=device),
                torch.ones(num_corrupted, dtype=torch.long, device=device),
            ]
        )
        return contrastive_loss(
            image_embeddings, text_embeddings, kinds, self.logit_scale(), self.config.contrastive_targets
        )

    def _corruption(self, map_logits: torch.Tensor, target_map: torch.Tensor, num_clean: int) -> torch.Tensor:
        if not self.config.decoder_on_clean:
            return corruption_map_loss(map_logits[num_clean:], target_map)
        clean_target = target_map.new_zeros((num_clean, *target_map.shape[1:]))
        return corruption_map_loss(map_logits, torch.cat([clean_target, target_map]))

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unweighted losses for the active names among ``contrastive`` and ``corruption``.

        Args:
            batch: ``image`` and ``corrupted`` ``(N, 3, H, W)`` in [0, 1]; ``map`` ``(N, 1, H, W)`` in [0, 1]
                (needed only when ``corruption`` is active).
        """
        unknown = set(self.active_losses) - set(CGCLIP_LOSSES)
        if unknown or not self.active_losses:
            raise ValueError(
                f"active_losses must be a non-empty subset of {CGCLIP_LOSSES}, got {sorted(self.active_losses)}"
            )
        clean, corrupted = batch["image"], batch["corrupted"]
        if clean.shape != corrupted.shape:
            raise ValueError(
                f"batch 'image' {tuple(clean.shape)} and 'corrupted' {tuple(corrupted.shape)} differ in shape"
            )
        pixels = torch.cat([clean, corrupted])
        num_clean = clean.shape[0]
        losses: dict[str, torch.Tensor] = {}
        if "corruption" in self.active_losses:
            target_map = batch["map"]
            expected = (corrupted.shape[0], 1, *corrupted.shape[-2:])
            if tuple(target_map.shape) != expected:
                raise ValueError(f"batch 'map' must have shape {expected}, got {tuple(target_map.shape)}")
            image_embeddings, map_logits = self.model.encode_image_and_map(pixels, normalize=True)
            losses["corruption"] = self._corruption(map_logits, target_map, num_clean)
        else:
            image_embeddings = self.model.encode_image(pixels, normalize=True)
        if "contrastive" in self.active_losses:
            losses["contrastive"] = self._contrastive(image_embeddings, num_clean)
        return losses


def build_cgclip_task(model: ModelConfig, method: CGClipConfig) -> CGClipTask:
    """Build the backbone named by ``model`` (random init, a tag or a local path) and wrap it as a CG-CLIP task."""
    from robustfm.models import create_model

    clip = create_model(model.name, pretrained=model.pretrained)
    cgclip = CGClipModel(clip, decoder_channels=method.decoder_channels, tap_blocks=method.tap_blocks)
    return CGClipTask(cgclip, method)
