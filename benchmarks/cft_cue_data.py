"""The planted spurious cue of ``benchmarks/fidelity_cft.py``: shapes whose class a watermark's colour gives away.

Each image is one of :data:`CLASS_SHAPES` on a random-colour background, with its exact object mask (the shape is
painted through its own mask, so image and mask cannot disagree). A one-patch watermark square sits on a patch of
``timm/tiny-vit``'s 8x8 grid that no object pixel touches: the concept mask S (the object) and the cue are disjoint,
so a relevance map can tell them apart exactly.

The object's hue is its class's (jittered, random saturation and brightness), the background's hue is uniform and its
saturation at most :data:`BACKGROUND_SATURATION`. The object is then evidence the tiny ViT can learn, but a less
reliable one than the watermark (a background may come close to an object's colour), and a base trained long enough
on cued images comes to read the cue (development runs, 400 steps: cue-flipped top-1 0.07-0.39 with cue-consistent
1.0, no-cue 0.6-0.86). What did not work: random object colours (``timm/tiny-vit`` from scratch does not learn
colour-free shapes in 1,400 steps: top-1 near chance, so no fine-tuning could move it onto them); fully saturated
backgrounds (often another class's hue: the object is hard to tell from its background); nearly grey ones (saturation
<= 0.3: the base learns the object as well as the cue and never depends on the cue, cue-flipped top-1 0.63).

The watermark's colour is :data:`CUE_COLORS` ``[(label + shift) % classes]``: ``shift = 0`` in training and in the
cue-consistent test set, ``1`` in the cue-flipped one (the colour of class y+1), and no watermark in the no-cue set.
The three test sets are the same images apart from that square, so their accuracies are paired image by image.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from robustfm.data.demo_images import draw_shape
from robustfm.seeding import sample_seed

CLASS_SHAPES = ("circle", "square", "triangle", "cross")
"""The four classes (shapes of :func:`robustfm.data.demo_images.draw_shape`; its ``ring`` is left out)."""
OBJECT_HUES = (0.0, 0.25, 0.5, 0.75)
"""Hue (HSV, in turns) of each class's objects, before a jitter of +-:data:`HUE_JITTER`."""
HUE_JITTER = 0.04
CUE_COLORS = ((255, 191, 0), (0, 255, 64), (0, 64, 255), (255, 0, 191))
"""Watermark colour of each class: fully saturated, at the hue halfway between two classes' object hues, so that a
watermark is never mistaken for an object's colour."""
NOISE_STD = 6.0
"""Per-pixel Gaussian noise (of 255) on every image, and on RRDA's fill, so a filled region is no smoother."""
BACKGROUND_SATURATION = 0.6
"""Largest saturation of a background (the module docstring says why)."""
SIZE = 64
"""``timm/tiny-vit``'s fixed input side."""
PATCH = 8
"""Its patch side: the watermark is exactly one token."""


@dataclass(frozen=True)
class CueImages:
    """A set of generated images without their watermark, and where the watermark goes.

    Attributes:
        clean: ``(N, 3, S, S)`` float32 in [0, 1], no watermark (the no-cue images).
        labels: ``(N,)`` long class indices into :data:`CLASS_SHAPES`.
        masks: ``(N, 1, S, S)`` uint8, 1 on the object's pixels (exact), 0 elsewhere (the watermark included).
        cells: ``(N, 2)`` long, the watermark's top-left pixel (row, column), multiples of :data:`PATCH`.
    """

    clean: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    cells: torch.Tensor

    def with_cue(self, shift: int | None) -> torch.Tensor:
        """The images with a watermark of class ``label + shift``'s colour (``None``: none, the clean images)."""
        if shift is None:
            return self.clean
        pixels = self.clean.clone()
        colors = torch.tensor(CUE_COLORS, dtype=torch.float32) / 255
        classes = (self.labels + shift) % len(CUE_COLORS)
        for row, ((top, left), cls) in enumerate(zip(self.cells.tolist(), classes.tolist(), strict=True)):
            pixels[row, :, top : top + PATCH, left : left + PATCH] = colors[cls][:, None, None]
        return pixels

    def watermark_masks(self) -> torch.Tensor:
        """``(N, 1, S, S)`` uint8, 1 on the watermark's pixels."""
        out = torch.zeros_like(self.masks)
        for row, (top, left) in enumerate(self.cells.tolist()):
            out[row, :, top : top + PATCH, left : left + PATCH] = 1
        return out


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    """An RGB colour in [0, 255] from HSV in [0, 1]."""
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value)) * 255


def cue_images(n: int, *, seed: int, scale: tuple[float, float] = (0.45, 0.7)) -> CueImages:
    """``n`` images, image ``i`` a function of ``(seed, i)`` only (``sample_seed(i, 0, "cft-cue", seed)``).

    Args:
        n: images.
        seed: the set's seed (training and test sets use different ones).
        scale: the shape's side as a fraction of the image's.
    """
    shapes, labels, masks, cells = [], [], [], []
    for index in range(n):
        rng = np.random.default_rng(sample_seed(index, 0, "cft-cue", seed))
        label = int(rng.integers(len(CLASS_SHAPES)))
        background = _hsv(rng.uniform(), rng.uniform(0, BACKGROUND_SATURATION), rng.uniform(0.15, 0.95))
        hue = OBJECT_HUES[label] + rng.uniform(-HUE_JITTER, HUE_JITTER)
        color = _hsv(hue, rng.uniform(0.65, 1.0), rng.uniform(0.65, 1.0))
        mask_image = Image.new("L", (SIZE, SIZE), 0)
        # The colour name is unused: only the mask is kept, and the image is painted through it below.
        draw_shape(Image.new("RGB", (SIZE, SIZE)), CLASS_SHAPES[label], "white", rng, scale=scale, mask=mask_image)
        mask = np.asarray(mask_image) > 0
        noise = rng.normal(0.0, NOISE_STD, size=(SIZE, SIZE, 3))
        pixels = np.where(mask[..., None], color, background) + noise
        # Patches the object does not touch: the watermark goes on one of them.
        touched = mask.reshape(SIZE // PATCH, PATCH, SIZE // PATCH, PATCH).any(axis=(1, 3))
        free = np.argwhere(~touched)
        cell = free[int(rng.integers(len(free)))] * PATCH
        shapes.append(np.clip(pixels, 0, 255).astype(np.uint8))
        labels.append(label)
        masks.append(mask)
        cells.append(cell)
    clean = torch.from_numpy(np.stack(shapes)).permute(0, 3, 1, 2).float().div(255).contiguous()
    return CueImages(
        clean=clean,
        labels=torch.tensor(labels, dtype=torch.long),
        masks=torch.from_numpy(np.stack(masks)[:, None].astype(np.uint8)),
        cells=torch.from_numpy(np.stack(cells)).long(),
    )


def pasted_on_other_context(
    pixels: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """RRDA's augmentation: each image's object pasted onto the context of another image of the batch.

    The other image's own object is first filled with the median colour of its pixels outside the object plus the
    images' noise (the backgrounds are flat colours, so this removes it without leaving a silhouette of another
    class); its watermark stays, and so, pasted under an object of a random class, the cue no longer tells the class.

    Args:
        pixels: ``(N, 3, S, S)`` in [0, 1].
        masks: ``(N, 1, S, S)``, object where > 0.
        generator: draws the pairing (a random permutation; an image may keep its own context).

    Returns:
        ``(composited pixels, the permutation (N,) giving each image's context)``.
    """
    inside = masks > 0
    fill = torch.stack(
        [img.flatten(1)[:, ~m.flatten()].median(dim=1).values for img, m in zip(pixels, inside, strict=True)]
    )
    noise = torch.randn(pixels.shape, generator=generator, dtype=pixels.dtype) * (NOISE_STD / 255)
    context = torch.where(inside, (fill[:, :, None, None] + noise).clamp(0, 1), pixels)
    order = torch.randperm(pixels.shape[0], generator=generator)
    return torch.where(inside, pixels, context[order]), order
