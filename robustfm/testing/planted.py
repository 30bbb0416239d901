"""Planted-evidence data sets, where the pixels that decide the label are known exactly, and a tiny ViT trained on them.

Attribution tests need a model whose evidence is known. Two data sets plant it:

- :func:`watermark_images`: the label is the COLOUR of a small solid square (the "watermark") aligned to the 8 px
  patch grid, on a photo crop or gradient, with a label-independent shape as a distractor. A model that fits the
  rule must look at the watermark's patches, and at nothing else. With some images left unmarked (an extra class),
  no colour class can be the "none of the others" default: each must be recognised by its own watermark.
- :func:`shape_images`: the label is an object (its shape and colour, :func:`~robustfm.data.demo_images.class_style`)
  on a photo crop, with its exact mask (the evidence of a natural-looking classification task).

:func:`train_classifier` fits ``timm/tiny-vit`` (4 blocks, width 64, 8x8 patch grid at 64 px) to either on one CPU
core (~0.07 s a step of 32 images: the watermark rule in 500 steps, the shapes in >= 1000); the caller chooses the
threads. Every image is a function of ``(seed, index)`` only.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from robustfm.data.demo_images import COLORS, SHAPES, draw_shape, gradient_background, real_photos, square_crop
from robustfm.data.demo_images import class_style as shape_class_style
from robustfm.models import TimmClassifier, create_model
from robustfm.seeding import sample_seed

#: Watermark colour of each class: saturated, and none of them a colour of :data:`~robustfm.data.demo_images.COLORS`
#: (the distractor shapes'), so that only the watermark can tell the classes apart.
WATERMARK_COLORS = (
    (128, 0, 255),
    (0, 255, 128),
    (255, 0, 128),
    (0, 128, 255),
    (255, 128, 0),
    (128, 255, 0),
)
#: The patch size of ``timm/tiny-vit``: watermarks cover whole patches of its grid.
PATCH = 8
#: Side of the photos the backgrounds are cropped from (4x the 64 px images: crops keep their detail).
PHOTO_SIDE = 256


@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
    """The colour photos scikit-image ships, centre-cropped to ``PHOTO_SIDE`` (uint8 HWC), loaded once."""
    return tuple(real_photos(PHOTO_SIDE).values())


def photo_background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (60-100 % of the side) of a random scikit-image photo (:func:`real_photos`), resized to
    ``size``."""
    photos = _photos()
    return square_crop(photos[int(rng.integers(len(photos)))], size, rng)


def _stack(images: list[np.ndarray], masks: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return pixels.contiguous(), torch.from_numpy(np.stack(masks)[:, None] > 0).float()


def watermark_images(
    n: int,
    *,
    size: int = 64,
    classes: int = 4,
    seed: int,
    square: int = 16,
    with_objects: bool = True,
    unmarked: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` images whose label is the colour of a patch-aligned solid square.

    Image ``i`` draws from its own generator (``sample_seed(i, 0, "watermark", seed)``): its background (a photo crop
    or a gradient, evenly), its label (uniform over the colours, or with probability ``unmarked`` none), the
    distractor (a random shape of :data:`SHAPES` in a random colour of :data:`COLORS`, 30-60 % of the side, anywhere)
    and the watermark's grid position (uniform over the positions where it fits). The watermark is painted last, in
    :data:`WATERMARK_COLORS` ``[label]``.

    Why ``unmarked``: when every image carries one of ``classes`` colours, a classifier can fit the rule with one
    class as the default ("none of the other colours"), and that class's logit then does not depend on its own
    watermark at all (seen with 4 classes: CCI then rightly finds no watermark evidence for it). Images without a
    watermark, labelled ``classes``, make "none" a class of its own.

    Args:
        n: images.
        size: image side, a multiple of 8.
        classes: labels, at most ``len(WATERMARK_COLORS)``.
        seed: the data set's seed.
        square: the watermark's side, a multiple of 8 (16: 2x2 patches of ``timm/tiny-vit``).
        with_objects: paint the distractor shape.
        unmarked: the probability that an image gets no watermark; its label is then ``classes`` (train with
            ``classes + 1`` outputs).

    Returns:
        ``(pixels (n, 3, size, size) float32 in [0, 1], labels (n,) long, watermark_masks (n, 1, size, size),
        object_masks (n, 1, size, size))``; masks are float {0, 1}. The object mask marks the distractor's visible
        pixels (the watermark painted over it excluded); all zeros without objects.
    """
    if not 1 <= classes <= len(WATERMARK_COLORS):
        raise ValueError(f"classes must be in 1..{len(WATERMARK_COLORS)} (one watermark colour each), got {classes}")
    if size % PATCH or square % PATCH or not PATCH <= square <= size:
        raise ValueError(f"size ({size}) and square ({square}) must be multiples of {PATCH} with square <= size")
    images, labels, marks, objects = [], [], [], []
    cells = (size - square) // PATCH + 1  # grid positions of the watermark's top-left patch, per axis
    for index in range(n):
        rng = np.random.default_rng(sample_seed(index, 0, "watermark", seed))
        background = photo_background(size, rng) if rng.random() < 0.5 else gradient_background((size, size), rng)
        image = Image.fromarray(background)
        label = classes if rng.random() < unmarked else int(rng.integers(classes))
        object_mask = Image.new("L", image.size, 0)
        if with_objects:
            shape, color = SHAPES[int(rng.integers(len(SHAPES)))], tuple(COLORS)[int(rng.integers(len(COLORS)))]
            draw_shape(image, shape, color, rng, scale=(0.3, 0.6), mask=object_mask)
        top, left = (int(v) * PATCH for v in rng.integers(cells, size=2))
        pixels = np.array(image)
        mark = np.zeros((size, size), np.uint8)
        if label < classes:
            pixels[top : top + square, left : left + square] = WATERMARK_COLORS[label]
            mark[top : top + square, left : left + square] = 1
        images.append(pixels)
        labels.append(label)
        marks.append(mark)
        objects.append(np.asarray(object_mask) * (1 - mark))
    pixels, watermark_masks = _stack(images, marks)
    _, object_masks = _stack(images, objects)
    return pixels, torch.tensor(labels, dtype=torch.long), watermark_masks, object_masks


def shape_images(
    n: int, *, size: int = 64, classes: int = 10, seed: int, scale: tuple[float, float] = (0.35, 0.6)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` images whose label is the one object on them: class ``c``'s shape and colour (``class_style(c)``).

    Image ``i`` draws from its own generator (``sample_seed(i, 0, "shape", seed)``): its label (uniform), a photo
    crop as background, then the object (``scale``: its side as a fraction of the image's, anywhere).

    Returns:
        ``(pixels (n, 3, size, size) float32 in [0, 1], labels (n,) long, object_masks (n, 1, size, size) {0, 1})``.
    """
    if not 1 <= classes <= 40:
        raise ValueError(f"classes must be in 1..40 (distinct shape and colour pairs), got {classes}")
    images, labels, masks = [], [], []
    for index in range(n):
        rng = np.random.default_rng(sample_seed(index, 0, "shape", seed))
        label = int(rng.integers(classes))
        image = Image.fromarray(photo_background(size, rng))
        mask = Image.new("L", image.size, 0)
        draw_shape(image, *shape_class_style(label), rng, scale=scale, mask=mask)
        images.append(np.asarray(image))
        labels.append(label)
        masks.append(np.asarray(mask))
    pixels, object_masks = _stack(images, masks)
    return pixels, torch.tensor(labels, dtype=torch.long), object_masks


def train_classifier(
    pixels: torch.Tensor,
    labels: torch.Tensor,
    *,
    classes: int,
    steps: int,
    seed: int,
    lr: float = 2e-3,
    batch_size: int = 32,
    weight_decay: float = 0.05,
) -> TimmClassifier:
    """A ``timm/tiny-vit`` with ``classes`` outputs, trained from random init on ``(pixels, labels)``.

    AdamW on cross-entropy, ``steps`` steps of ``batch_size`` images (a fresh seeded shuffle per pass over the data),
    the learning rate warmed up linearly over the first 10 % of the steps, then cosine-decayed to 0: the last steps
    settle the fit instead of jumping around it. Initialisation and order depend on ``seed`` only; the global RNG is
    left as it was. Runs on ``pixels``' device with the caller's torch threads.

    Returns:
        The model in eval mode.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be >= 1")
    import timm

    with torch.random.fork_rng(devices=[]):
        create_model("timm/tiny-vit")  # registers robustfm_tiny_vit with timm (its random init draws from the RNG)
        torch.manual_seed(seed)
        model = TimmClassifier(timm.create_model("robustfm_tiny_vit", num_classes=classes), "tiny-vit")
    model = model.to(pixels.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + float(np.cos(np.pi * (step - warmup) / max(1, steps - warmup))))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    labels = labels.to(pixels.device)
    for _ in range(steps):
        if order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(pixels.shape[0], generator=generator)])
        rows, order = order[:batch_size].to(pixels.device), order[batch_size:]
        loss = F.cross_entropy(model(pixels[rows]), labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def predict(model: torch.nn.Module, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The predicted class ``(N,)`` of each image (argmax of the logits, no autograd)."""
    with torch.no_grad():
        return torch.cat([model(chunk).argmax(dim=1) for chunk in pixels.split(batch_size)])
