"""U-Net-style corruption decoder on the patch tokens of a ViT (CG-CLIP, paper 000, section 3.1 and appendix A.1).

The decoder reads the patch tokens after three transformer blocks (4, 8 and 12 on ViT-B/32) and predicts one logit per
input pixel: how corrupted that pixel is. Every tap comes out of the same ``gh x gw`` token grid (7x7 on ViT-B/32 at
224 px), so the "multi-scale" inputs are made multi-scale by resizing:

* the deepest tap (block 12) is the bottleneck, used at the native grid resolution (7x7);
* upsampling stage ``k`` (``k = 1 .. S``) doubles the resolution with a 2x2 transposed convolution
  (7 -> 14 -> 28 -> 56) and then, for ``k < S``, concatenates the next shallower tap (block 8 at stage 1, block 4 at
  stage 2), bilinearly resized from the token grid to that stage's resolution, before two 3x3 conv-norm-ReLU layers
  bring the channels to ``channels[k - 1]`` ([384, 192, 96]);
* the last stage has no skip (all taps are used), and the head is a 1x1 conv to one logit channel, bilinearly resized
  to the input resolution (56 -> 224 on ViT-B/32; a no-op on the 64 px tiny model, whose 8x8 grid reaches 64).

Shallow blocks thus feed the high-resolution stages, as in a U-Net, and each tap passes through a LayerNorm first
because the residual stream of a pre-norm ViT grows with depth. With the skips concatenated at full token width and
channels [384, 192, 96], the decoder has 9.02 M parameters on ViT-B/32, 5.963 % of CLIP's 151.28 M, matching the
paper's 5.96 % (about 9 M); ``tests/unit/test_cgclip_model_decoder.py`` checks it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_DECODER_CHANNELS = (384, 192, 96)
"""Channels of the three upsampling stages (appendix A.1)."""


def decoder_tap_blocks(num_blocks: int, num_taps: int = 3) -> tuple[int, ...]:
    """The 1-based transformer blocks the decoder reads, spread proportionally over the depth.

    Tap ``k`` (``k = 1 .. num_taps``) is block ``floor(k * num_blocks / num_taps)``: 12 blocks -> (4, 8, 12) as in the
    paper, 24 -> (8, 16, 24), 4 -> (1, 2, 4), 3 -> (1, 2, 3). The last tap is always the final block.

    Raises:
        ValueError: when the model has fewer blocks than taps (the taps would not be distinct).
    """
    if num_taps < 1:
        raise ValueError(f"num_taps must be at least 1, got {num_taps}")
    if num_blocks < num_taps:
        raise ValueError(
            f"a corruption decoder with {num_taps} taps needs at least {num_taps} blocks, got {num_blocks}"
        )
    return tuple((k * num_blocks) // num_taps for k in range(1, num_taps + 1))


def _group_count(channels: int) -> int:
    """Largest GroupNorm group count <= 32 that divides ``channels``.

    GroupNorm rather than BatchNorm: the decoder sees [clean; corrupted] batches whose halves have very different
    statistics, runs per rank under DDP/DeepSpeed, and must behave the same in train and eval mode.
    """
    for groups in (32, 16, 8, 4, 2):
        if channels % groups == 0:
            return groups
    return 1


class _ConvNormReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(_group_count(out_channels), out_channels),
            nn.ReLU(inplace=True),
        )


class _UpStage(nn.Module):
    """Upsample x2, optionally concatenate a skip map at the new resolution, then two 3x3 conv-norm-ReLU layers."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.upsample = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.fuse = nn.Sequential(
            _ConvNormReLU(out_channels + skip_channels, out_channels),
            _ConvNormReLU(out_channels, out_channels),
        )

    def forward(self, features: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        features = self.upsample(features)
        if skip is not None:
            features = torch.cat([features, skip], dim=1)
        return self.fuse(features)


class CorruptionDecoder(nn.Module):
    """Dense corruption-map head on ViT patch tokens (see the module docstring for the layout).

    Args:
        width: token width of the ViT (768 on ViT-B/32).
        grid_size: ``(gh, gw)`` patch grid of the ViT at its input resolution.
        channels: output channels of each upsampling stage; the decoder reads ``len(channels)`` taps.
    """

    def __init__(
        self, width: int, grid_size: tuple[int, int], channels: Sequence[int] = DEFAULT_DECODER_CHANNELS
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not channels or any(c <= 0 for c in channels):
            raise ValueError(f"decoder channels must be a non-empty list of positive integers, got {channels}")
        if width <= 0 or len(grid_size) != 2 or min(grid_size) <= 0:
            raise ValueError(
                f"decoder needs a positive token width and a 2-d grid, got width={width}, grid={grid_size}"
            )
        self.width = width
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.channels = channels
        self.num_taps = len(channels)
        self.tap_norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(self.num_taps))
        stages = []
        in_channels = width
        for index, out_channels in enumerate(channels):
            has_skip = index < self.num_taps - 1
            stages.append(_UpStage(in_channels, width if has_skip else 0, out_channels))
            in_channels = out_channels
        self.stages = nn.ModuleList(stages)
        self.head = nn.Conv2d(in_channels, 1, kernel_size=1)

    def _token_map(self, tokens: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        batch, length, width = tokens.shape
        grid_h, grid_w = self.grid_size
        if length != grid_h * grid_w or width != self.width:
            raise ValueError(
                f"decoder expects patch tokens of shape (N, {grid_h * grid_w}, {self.width}) without the class token, "
                f"got {tuple(tokens.shape)}"
            )
        return norm(tokens).transpose(1, 2).reshape(batch, width, grid_h, grid_w)

    def forward(self, taps: Sequence[torch.Tensor], output_size: tuple[int, int]) -> torch.Tensor:
        """Predict corruption logits.

        Args:
            taps: patch tokens ``(N, gh*gw, width)`` of the tapped blocks, ordered shallow to deep
                (blocks 4, 8, 12 on ViT-B/32).
            output_size: ``(H, W)`` of the input images.

        Returns:
            Logits ``(N, 1, H, W)``; apply a sigmoid for a map in [0, 1].
        """
        if len(taps) != self.num_taps:
            raise ValueError(f"decoder expects {self.num_taps} tapped blocks (shallow to deep), got {len(taps)}")
        maps = [self._token_map(tokens, norm) for tokens, norm in zip(taps, self.tap_norms, strict=True)]
        deep_to_shallow = maps[::-1]
        features = deep_to_shallow[0]
        for index, stage in enumerate(self.stages):
            skip = None
            if index + 1 < self.num_taps:
                target = (features.shape[-2] * 2, features.shape[-1] * 2)
                skip = F.interpolate(deep_to_shallow[index + 1], size=target, mode="bilinear", align_corners=False)
            features = stage(features, skip)
        logits = self.head(features)
        if tuple(logits.shape[-2:]) != tuple(output_size):
            logits = F.interpolate(logits, size=tuple(output_size), mode="bilinear", align_corners=False)
        return logits
