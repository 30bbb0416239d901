"""CG-CLIP losses: multi-positive contrastive against a brute-force reference, the plain CLIP loss, eq. 3 BCE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from robustfm.methods.losses import (
    clip_contrastive_loss,
    contrastive_loss,
    corruption_map_loss,
    multi_positive_contrastive_loss,
)


def brute_force_multi_positive(images: torch.Tensor, texts: torch.Tensor, captions: list[int], scale: float) -> float:
    """Loops over pairs in float64 Python: mean over both directions of -sum_{positives} (1/|P|) log softmax."""
    batch = len(captions)
    images = [F.normalize(v.double(), dim=0) for v in images]
    texts = [F.normalize(v.double(), dim=0) for v in texts]
    logits = [[scale * float(images[i] @ texts[j]) for j in range(batch)] for i in range(batch)]

    def direction(get) -> float:
        total = 0.0
        for a in range(batch):
            log_norm = math.log(sum(math.exp(get(a, b)) for b in range(batch)))
            positives = [b for b in range(batch) if captions[b] == captions[a]]
            total += -sum(get(a, b) - log_norm for b in positives) / len(positives)
        return total / batch

    image_to_text = direction(lambda i, j: logits[i][j])
    text_to_image = direction(lambda j, i: logits[i][j])
    return (image_to_text + text_to_image) / 2


@pytest.fixture
def embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)


def test_multi_positive_matches_brute_force(embeddings):
    images, texts = embeddings
    captions = [0, 1, 0, 2, 1, 0]
    scale = torch.tensor([7.5])
    loss = multi_positive_contrastive_loss(images, texts, torch.tensor(captions), scale)
    assert loss.item() == pytest.approx(brute_force_multi_positive(images, texts, captions, 7.5), rel=1e-5)


def test_multi_positive_equals_clip_when_captions_are_distinct(embeddings):
    images, texts = embeddings
    scale = torch.tensor(10.0)
    multi = multi_positive_contrastive_loss(images, texts, torch.arange(6), scale)
    plain = clip_contrastive_loss(images, texts, scale)
    assert multi.item() == pytest.approx(plain.item(), rel=1e-6)
    assert plain.item() == pytest.approx(brute_force_multi_positive(images, texts, list(range(6)), 10.0), rel=1e-5)


def test_multi_positive_differs_from_clip_when_captions_repeat(embeddings):
    images, texts = embeddings
    kinds = torch.tensor([0, 0, 0, 1, 1, 1])  # [clean; corrupted] with one caption per kind
    scale = torch.tensor(10.0)
    multi = contrastive_loss(images, texts, kinds, scale, "multi_positive")
    plain = contrastive_loss(images, texts, kinds, scale, "clip")
    assert abs(multi.item() - plain.item()) > 1e-3


def test_multi_positive_reaches_its_floor_when_kinds_separate():
    # One caption per kind and images that match their kind's caption exactly: the best a soft target over 3
    # positives allows is its entropy, log(3).
    images = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)
    texts = images.clone()
    kinds = torch.tensor([0, 0, 0, 1, 1, 1])
    loss = multi_positive_contrastive_loss(images, texts, kinds, torch.tensor(100.0))
    assert loss.item() == pytest.approx(math.log(3), abs=1e-4)


def test_contrastive_gradients_reach_both_sides_and_the_scale(embeddings):
    images, texts = (e.clone().requires_grad_(True) for e in embeddings)
    log_scale = torch.tensor([2.0], requires_grad=True)
    multi_positive_contrastive_loss(images, texts, torch.tensor([0, 0, 0, 1, 1, 1]), log_scale.exp()).backward()
    assert images.grad.abs().sum() > 0 and texts.grad.abs().sum() > 0 and log_scale.grad.abs().sum() > 0


def test_contrastive_rejects_mismatched_inputs(embeddings):
    images, texts = embeddings
    with pytest.raises(ValueError, match="one text embedding per image"):
        clip_contrastive_loss(images, texts[:4], torch.tensor(1.0))
    with pytest.raises(ValueError, match="caption_ids"):
        multi_positive_contrastive_loss(images, texts, torch.tensor([0, 1]), torch.tensor(1.0))
    with pytest.raises(ValueError, match="contrastive_targets"):
        contrastive_loss(images, texts, torch.arange(6), torch.tensor(1.0), "softmax")  # type: ignore[arg-type]


def test_bce_matches_torch_and_hand_computation():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]])
    target = torch.tensor([[[[0.0, 1.0], [0.25, 0.5]]]])
    expected_by_hand = 0.0
    for z, y in zip(logits.flatten().tolist(), target.flatten().tolist(), strict=True):
        p = 1 / (1 + math.exp(-z))
        expected_by_hand += -(y * math.log(p) + (1 - y) * math.log(1 - p))
    expected_by_hand /= 4
    loss = corruption_map_loss(logits, target)
    assert loss.item() == pytest.approx(expected_by_hand, rel=1e-6)
    assert loss.item() == pytest.approx(F.binary_cross_entropy(torch.sigmoid(logits), target).item(), rel=1e-5)


def test_bce_is_stable_for_large_logits_and_checks_shapes():
    logits = torch.tensor([[[[80.0, -80.0]]]])
    assert torch.isfinite(corruption_map_loss(logits, torch.tensor([[[[1.0, 0.0]]]])))
    with pytest.raises(ValueError, match="differ in shape"):
        corruption_map_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 8, 8))


def test_with_one_prompt_per_kind_eq2_and_multi_positive_agree_in_loss_and_gradients():
    """CG-CLIP's batches pair every image with one of two captions: identical captions have identical logits, so
    eq. 2 as written (the default) and multi-positive targets give the same loss and the same gradients."""
    from robustfm.methods.cgclip import CGClipModel, CGClipTask
    from robustfm.methods.cgclip_config import CGClipConfig
    from robustfm.models import create_model

    torch.manual_seed(0)
    model = CGClipModel(create_model("open_clip/tiny-vit"), decoder_channels=(8, 4, 2))
    batch = {"image": torch.rand(3, 3, 64, 64), "corrupted": torch.rand(3, 3, 64, 64)}
    found = {}
    for targets in ("clip", "multi_positive"):
        task = CGClipTask(model, CGClipConfig(decoder_channels=(8, 4, 2), contrastive_targets=targets))
        task.active_losses = frozenset({"contrastive"})
        model.zero_grad()
        loss = task(batch)["contrastive"]
        loss.backward()
        found[targets] = (loss.item(), [p.grad.clone() for p in model.clip.parameters() if p.grad is not None])
    assert found["clip"][0] == pytest.approx(found["multi_positive"][0], rel=1e-6)
    for a, b in zip(found["clip"][1], found["multi_positive"][1], strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()
    assert CGClipConfig().contrastive_targets == "clip"  # eq. 2 as the paper writes it is the default
