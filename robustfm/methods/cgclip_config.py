"""The ``method`` section of a CG-CLIP config: decoder layout, prompts, contrastive targets, temperature.

Importing this module imports neither torch nor open_clip, so a bad config fails before anything heavy starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from robustfm.config import check
from robustfm.methods import METHODS


@dataclass(frozen=True)
class CGClipConfig:
    """How the CG-CLIP task is built (paper 000, section 3 and appendix A.1)."""

    decoder_channels: tuple[int, ...] = (384, 192, 96)
    """Output channels of the decoder's upsampling stages (appendix A.1: [384, 192, 96]). The decoder reads one
    transformer block per stage."""
    tap_blocks: tuple[int, ...] | None = None
    """1-based blocks whose patch tokens feed the decoder, shallow to deep, one per decoder stage. None: spread
    proportionally over the depth (``floor(k * depth / stages)``: 4, 8, 12 on the 12 blocks of ViT-B/32, as in the
    paper; 1, 2, 4 on the 4-block tiny model)."""
    clean_prompts: tuple[str, ...] = ("a clean photograph",)
    """Object-agnostic captions of clean images (section 3.3). Image ``i`` of the batch gets prompt ``i mod len``;
    all prompts of this list count as the same caption for the multi-positive targets (they are paraphrases)."""
    corrupt_prompts: tuple[str, ...] = ("a corrupt photograph",)
    """Captions of corrupted images, used the same way as ``clean_prompts``."""
    contrastive_targets: Literal["multi_positive", "clip"] = "clip"
    """``clip``: eq. 2 as written (target = the diagonal). ``multi_positive``: every image-text pair of the same kind
    is a positive, targets uniform over the positives in both directions. With one prompt per kind both give the same
    loss and gradients (identical captions have identical logits); they differ only with several paraphrased prompts
    per kind, where ``clip`` pushes an image away from its own kind's other phrasings."""
    logit_scale: Literal["trainable", "fixed"] = "trainable"
    """``trainable``: the CLIP temperature ``1/tau`` is learned with the text encoder (eq. 2's learnable tau).
    ``fixed``: it is used but receives no gradient."""
    logit_scale_init: float | None = None
    """Multiplier ``1/tau`` to start from (or keep, when fixed). None: the loaded model's own value (100 for the
    OpenAI ViT-B/32 weights, 1/0.07 at random init). The learned parameter is clamped at 100 after each optimizer
    step, as open_clip does (a clamp in the forward pass would pass no gradient at 100)."""
    decoder_on_clean: bool = True
    """Also train the decoder on the clean half of the batch, with an all-zero target (a clean image has no
    corruption; ``map`` in the batch covers the corrupted half only). False: BCE on the corrupted half only."""

    def __post_init__(self) -> None:
        check(len(self.decoder_channels) > 0, "decoder_channels", self.decoder_channels, "must list at least one stage")
        check(all(c > 0 for c in self.decoder_channels), "decoder_channels", self.decoder_channels, "must be positive")
        if self.tap_blocks is not None:
            check(
                len(self.tap_blocks) == len(self.decoder_channels),
                "tap_blocks",
                self.tap_blocks,
                f"must name one block per decoder stage ({len(self.decoder_channels)})",
            )
            check(
                all(b >= 1 for b in self.tap_blocks) and list(self.tap_blocks) == sorted(set(self.tap_blocks)),
                "tap_blocks",
                self.tap_blocks,
                "must be distinct 1-based block numbers in increasing order (shallow to deep)",
            )
        for name in ("clean_prompts", "corrupt_prompts"):
            prompts = getattr(self, name)
            check(len(prompts) > 0, name, prompts, "must hold at least one prompt")
            check(all(p.strip() for p in prompts), name, prompts, "must not contain empty prompts")
        shared = sorted(set(self.clean_prompts) & set(self.corrupt_prompts))
        check(
            not shared,
            "corrupt_prompts",
            shared,
            "must not repeat a clean prompt (the two kinds would share a caption)",
        )
        check(
            self.logit_scale_init is None
            or (math.isfinite(self.logit_scale_init) and 0 < self.logit_scale_init <= 100),
            "logit_scale_init",
            self.logit_scale_init,
            "must be a positive number up to 100 (the multiplier 1/tau; CLIP bounds it at 100) or null",
        )


METHODS.register_lazy(
    "cgclip",
    "robustfm.methods.cgclip:build_cgclip_task",
    losses=("contrastive", "corruption"),
    param_groups=("image_encoder", "text_encoder", "decoder"),
    needs=(),
    config=CGClipConfig,
    description="CG-CLIP (paper 000): CLIP + U-Net corruption decoder, contrastive + BCE losses",
)
