"""Deletion / insertion curves: exactly round(k * f * H * W) pixels changed at step k, the clean image or the canvas at
step 0, seeded tie-breaks and noise, batching that changes nothing, the AUC rule, and on a linear model with known
evidence the ordering oracle < random < reversed (deletion) and the reverse (insertion)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robustfm.explain import curve_auc, faithfulness_curves
from robustfm.explain.faithfulness import image_generators, pixel_ranking, pixels_at_step

SIZE = 20  # 400 pixels: fraction 0.013 -> 5.2 pixels per step, never a rounding tie


class Recorder(nn.Module):
    """A 3-class model that keeps every batch it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images.clone())
        return torch.stack([images.mean((1, 2, 3)), images[:, 0].mean((1, 2)), images[:, 1].mean((1, 2))], dim=1)


def run_recorded(mode, pixels, maps, fraction=0.013, steps=30, batch_size=16, **kwargs):
    model = Recorder()
    curves = faithfulness_curves(
        model,
        pixels,
        maps,
        torch.zeros(pixels.shape[0], dtype=torch.long),
        mode=mode,
        seeds=list(range(pixels.shape[0])),
        fraction_per_step=fraction,
        steps=steps,
        batch_size=batch_size,
        **kwargs,
    )
    return curves, torch.cat(model.seen).reshape(pixels.shape[0], steps + 1, *pixels.shape[1:])


@pytest.fixture
def pixels():
    return torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.1  # never exactly 0


@pytest.fixture
def maps():
    return torch.rand(3, 5, 5, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_step_k_changes_exactly_the_scheduled_pixels(pixels, maps, mode):
    curves, images = run_recorded(mode, pixels, maps, canvas=0.0)
    start = pixels if mode == "deletion" else torch.zeros_like(pixels)
    assert torch.equal(images[:, 0], start)
    ranking = pixel_ranking(maps, (SIZE, SIZE), image_generators([0, 1, 2]))
    for step in range(31):
        changed = (images[:, step] != start).any(dim=1).flatten(1)  # (N, H*W)
        count = math.floor(step * 0.013 * SIZE * SIZE + 0.5)
        assert changed.sum(1).tolist() == [count] * 3, step
        assert torch.equal(changed, ranking < count)  # the top-ranked pixels, and no others
        if mode == "insertion":
            revealed = images[:, step].flatten(2)[changed[:, None].expand(-1, 3, -1)]
            assert torch.equal(revealed, pixels.flatten(2)[changed[:, None].expand(-1, 3, -1)])
    assert curves.ranks.shape == curves.probs.shape == (3, 31)


def test_deletion_noise_is_seeded_uniform_and_fixed_across_steps(pixels, maps):
    _, images = run_recorded("deletion", pixels, maps)
    _, again = run_recorded("deletion", pixels, maps, batch_size=5)
    assert torch.equal(images, again)
    last = images[:, -1]
    replaced = (last != pixels).any(dim=1, keepdim=True).expand_as(pixels)
    generators = image_generators(range(3))
    for generator in generators:
        torch.randperm(SIZE * SIZE, generator=generator)  # the tie-break is drawn first, then the noise
    noise = torch.stack([torch.rand(3, SIZE, SIZE, generator=generator) for generator in generators])
    assert torch.equal(last[replaced], noise[replaced])
    # a pixel replaced at step k keeps its noise value at every later step
    early = (images[:, 10] != pixels).any(dim=1, keepdim=True).expand_as(pixels)
    assert torch.equal(images[:, 10][early], last[early])


def test_ties_are_broken_by_a_seeded_permutation():
    flat = torch.zeros(2, 4, 4)
    first = pixel_ranking(flat, (4, 4), image_generators([3, 4]))
    assert torch.equal(first, pixel_ranking(flat, (4, 4), image_generators([3, 4])))
    assert sorted(first[0].tolist()) == list(range(16)) and not torch.equal(first[0], first[1])
    graded = torch.tensor([[[0.0, 1.0], [1.0, 2.0]]])  # the two 1.0 cells tie
    ranking = pixel_ranking(graded, (2, 2), image_generators([0]))[0]
    assert ranking[3] == 0 and ranking[0] == 3 and sorted(ranking[1:3].tolist()) == [1, 2]


def test_batch_size_does_not_change_the_curves(pixels, maps):
    small, _ = run_recorded("insertion", pixels, maps, batch_size=4)
    large, _ = run_recorded("insertion", pixels, maps, batch_size=1000)
    assert torch.equal(small.ranks, large.ranks) and torch.equal(small.probs, large.probs)


def test_auc_is_the_trapezoid_rule_on_the_normalised_step():
    assert curve_auc(torch.ones(1, 101)).item() == pytest.approx(1.0)
    assert curve_auc(torch.linspace(0, 1, 11)[None]).item() == pytest.approx(0.5)
    assert curve_auc(torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.5)
    assert curve_auc(torch.tensor([[0.0, 1.0, 1.0]])).item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="steps >= 1"):
        curve_auc(torch.ones(1, 1))


class EvidenceModel(nn.Module):
    """Linear logits: class 0 = sum_p w_p * (mean_c x_p - 0.5), class 1 = 0; the evidence w is a centred blob."""

    def __init__(self, size: int) -> None:
        super().__init__()
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        blob = torch.exp(-((yy - size / 2) ** 2 + (xx - size / 3) ** 2) / (2 * (size / 5) ** 2))
        self.register_buffer("evidence", blob / blob.sum() * 16.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        score = ((images.mean(1) - 0.5) * self.evidence).sum((1, 2))
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def test_oracle_random_reversed_order_on_a_linear_model():
    model = EvidenceModel(SIZE)
    pixels = torch.ones(4, 3, SIZE, SIZE)  # every pixel carries +0.5 * w_p of evidence for class 0
    targets = torch.zeros(4, dtype=torch.long)
    oracle = model.evidence.expand(4, -1, -1)
    maps = {
        "oracle": oracle,
        "random": torch.rand(4, SIZE, SIZE, generator=torch.Generator().manual_seed(5)),
        "reversed": -oracle,
    }
    aucs = {}
    for mode in ("deletion", "insertion"):
        for name, attribution in maps.items():
            curves = faithfulness_curves(
                model, pixels, attribution, targets, mode=mode, seeds=[0, 1, 2, 3], fraction_per_step=0.01, steps=100
            )
            aucs[mode, name] = curves.auc("prob").mean().item()
            assert curves.topk(1)[:, 0].eq(1 if mode == "deletion" else 0).all()  # clean: class 0; canvas: class 1
    assert aucs["deletion", "oracle"] < aucs["deletion", "random"] < aucs["deletion", "reversed"]
    assert aucs["insertion", "oracle"] > aucs["insertion", "random"] > aucs["insertion", "reversed"]


def test_schedule_and_arguments_are_checked(pixels, maps):
    targets = torch.zeros(3, dtype=torch.long)
    call = dict(seeds=[0, 1, 2], mode="deletion")
    with pytest.raises(ValueError, match=r"fraction_per_step \* steps = 0\.02 \* 60 = 1\.2 > 1"):
        faithfulness_curves(Recorder(), pixels, maps, targets, fraction_per_step=0.02, steps=60, **call)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        faithfulness_curves(Recorder(), pixels, maps, targets, steps=0, **call)
    with pytest.raises(ValueError, match="fraction_per_step must be > 0"):
        faithfulness_curves(Recorder(), pixels, maps, targets, fraction_per_step=0.0, **call)
    with pytest.raises(ValueError, match="mode must be one of"):
        faithfulness_curves(Recorder(), pixels, maps, targets, seeds=[0, 1, 2], mode="erase")
    with pytest.raises(ValueError, match="one seed per map"):
        faithfulness_curves(Recorder(), pixels, maps, targets, seeds=[0], mode="deletion")
    with pytest.raises(ValueError, match="targets must be integer class indices"):
        faithfulness_curves(Recorder(), pixels, maps, targets.float(), **call)
    assert pixels_at_step(100, 0.005, 224 * 224) == 25088  # half the image at the paper's schedule


def test_ranks_and_probabilities_come_from_one_pass(pixels, maps):
    curves, images = run_recorded("deletion", pixels, maps)
    logits = Recorder()(images.flatten(0, 1)).reshape(3, 31, 3)
    torch.testing.assert_close(curves.probs, logits.softmax(-1)[..., 0])
    assert torch.equal(curves.ranks, (logits > logits[..., :1]).sum(-1))
    assert torch.equal(curves.topk(5), torch.ones(3, 31))  # 3 classes: always in the top 5
    assert curves.auc("top1").shape == (3,)
    with pytest.raises(ValueError, match="'prob' or 'top<k>'"):
        curves.auc("top")


def test_a_relevance_map_of_a_tiny_vit_end_to_end():
    from robustfm.explain import relevance
    from robustfm.models import create_model

    torch.manual_seed(0)
    model = create_model("timm/tiny-vit").eval()
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    targets = model(pixels).argmax(1)
    maps = relevance("attnlrp", model, pixels, targets)
    with torch.inference_mode():
        curves = faithfulness_curves(
            model, pixels, maps, targets, mode="deletion", seeds=[0, 1], steps=10, fraction_per_step=0.05, batch_size=8
        )
    assert curves.ranks[:, 0].eq(0).all()  # the predicted class is top-1 on the clean image
    assert curves.probs.shape == (2, 11) and torch.isfinite(curves.probs).all()
