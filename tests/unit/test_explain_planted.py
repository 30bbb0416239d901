"""CCI on a model whose evidence is planted: a tiny ViT trained (in the test, one CPU thread) to read the label from the
colour of a patch-aligned square, with a label-independent shape as a distractor (and a fifth class for images
without a square, so that no colour class is a default). On held-out marked images it classifies correctly, CCI's
positive weight must sit on the clusters that contain the square, and deleting pixels in CCI's order must lower the
class probability faster than deleting them in a random order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robustfm.explain import cci, faithfulness_curves
from robustfm.testing.planted import PATCH, predict, train_classifier, watermark_images

pytestmark = pytest.mark.slow

CLASSES = 4  # watermark colours; label CLASSES: no watermark
UNMARKED = 0.2
TRAIN_IMAGES = 256
HELD_OUT = 32
MIN_EXPLAINED = 16
K = 7


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Training and CCI on one torch thread (their speed target; the machine's other core stays free)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def planted():
    """The trained model, its training accuracy and the correctly classified held-out images (all marked) with their
    watermark masks."""
    pixels, labels, _, _ = watermark_images(TRAIN_IMAGES, classes=CLASSES, seed=0, unmarked=UNMARKED)
    model = train_classifier(pixels, labels, classes=CLASSES + 1, steps=500, seed=0)
    train_accuracy = float((predict(model, pixels) == labels).float().mean())
    images, classes, marks, _ = watermark_images(HELD_OUT, classes=CLASSES, seed=1)
    correct = predict(model, images) == classes
    return model, train_accuracy, images[correct], classes[correct], marks[correct]


@pytest.fixture(scope="module")
def explained(planted):
    """CCI of the correctly classified held-out images for their labels (image ``i`` seeded by ``i``)."""
    model, _, images, classes, _ = planted
    return cci(model, images, classes, seeds=range(images.shape[0]), k=K)


def watermark_share(weights: torch.Tensor, labels: torch.Tensor, marks: torch.Tensor) -> torch.Tensor:
    """``(N,)``: the positive cluster weight on clusters with a patch in the watermark, over all positive weight."""
    in_mark = F.avg_pool2d(marks, PATCH).flatten(1) > 0  # (N, patches): whole patches, the square is grid-aligned
    touches = (F.one_hot(labels, weights.shape[1]).bool() & in_mark[..., None]).any(dim=1)  # (N, K)
    positive = weights.clamp(min=0)
    return (positive * touches).sum(dim=1) / positive.sum(dim=1)


def test_the_model_fits_the_watermark_rule(planted):
    _, train_accuracy, images, _, _ = planted
    assert train_accuracy >= 0.98
    assert images.shape[0] >= MIN_EXPLAINED, f"only {images.shape[0]} of {HELD_OUT} held-out images are correct"


def test_cci_puts_its_positive_weight_on_the_watermark(planted, explained):
    *_, marks = planted
    result = explained
    assert not result.degenerate.any()
    share = watermark_share(result.weights, result.labels, marks)
    per_image = ", ".join(f"{value:.2f}" for value in share.tolist())
    assert float(share.mean()) >= 0.8, f"mean {float(share.mean()):.3f}; per image: {per_image}"


def test_cci_deletion_drops_the_class_faster_than_a_random_map(planted, explained):
    model, _, images, classes, _ = planted
    seeds = list(range(images.shape[0]))
    maps = explained.map
    generator = torch.Generator().manual_seed(0)
    random_maps = torch.stack([torch.rand(maps.shape[1:], generator=generator) for _ in seeds])
    schedule = dict(mode="deletion", seeds=seeds, fraction_per_step=0.02, steps=20)  # up to 40 % of the pixels
    auc = {
        name: faithfulness_curves(model, images, m, classes, **schedule).auc("prob").mean().item()
        for name, m in (("cci", maps), ("random", random_maps))
    }
    assert auc["cci"] < auc["random"], auc
