"""CCI on both tiny ViTs: seeded, independent of batch composition and of cluster numbering; weights that sum to 1;
masked scores equal to a recomputation by hand (timm's own attn_mask path); degenerate and empty clusters; the
feature options; clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robustfm.explain import cci, clip_class_score
from robustfm.explain.cci import cluster_attribution, patch_features
from robustfm.explain.relevance import resolve_score
from robustfm.models import TINY_MODELS, ClipModel, create_model
from robustfm.models.attention import attention_adapter, attention_taps, key_mask

CLOSE = dict(atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module", params=TINY_MODELS)
def model(request):
    torch.manual_seed(0)
    return create_model(request.param).eval()


@pytest.fixture(scope="module")
def pixels():
    return torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))


TEXT = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))


def target_for(model, classes):
    classes = torch.as_tensor(classes)
    return clip_class_score(TEXT, classes) if isinstance(model, ClipModel) else classes


def test_maps_are_seeded_and_weights_sum_to_one(model, pixels):
    target = target_for(model, [0, 1, 2, 3])
    first = cci(model, pixels, target, seeds=[10, 11, 12, 13], k=5)
    again = cci(model, pixels, target, seeds=[10, 11, 12, 13], k=5)
    assert torch.equal(first.labels, again.labels) and torch.equal(first.map, again.map)
    assert first.weights.shape == (4, 5) and first.labels.shape == (4, 64) and first.map.shape == (4, 8, 8)
    assert not first.degenerate.any()
    torch.testing.assert_close(first.weights.sum(1), torch.ones(4), **CLOSE)
    # map[p] = w[label of p]; the map takes each cluster's weight on that cluster's patches
    torch.testing.assert_close(first.map.flatten(1), first.weights.gather(1, first.labels))
    assert set(first.labels.unique().tolist()) == set(range(5))


def test_maps_do_not_depend_on_batch_composition(model, pixels):
    together = cci(model, pixels, target_for(model, [0, 1, 2, 3]), seeds=[10, 11, 12, 13], k=5, batch_size=7)
    for row in (1, 3):
        alone = cci(model, pixels[row : row + 1], target_for(model, [row]), seeds=[10 + row], k=5, batch_size=64)
        assert torch.equal(alone.labels[0], together.labels[row])
        torch.testing.assert_close(alone.map[0], together.map[row], **CLOSE)
        torch.testing.assert_close(alone.scores[0], together.scores[row], **CLOSE)


def test_maps_do_not_depend_on_cluster_numbering(model, pixels):
    labels = torch.randint(0, 4, (2, 64), generator=torch.Generator().manual_seed(3))
    score = resolve_score(model, target_for(model, [1, 2]), 2)
    original = cluster_attribution(model, pixels[:2], labels, score, k=4)
    permutation = torch.tensor([2, 0, 3, 1])  # cluster c is renamed permutation[c]
    renamed = cluster_attribution(model, pixels[:2], permutation[labels], score, k=4)
    torch.testing.assert_close(renamed.map, original.map, **CLOSE)
    torch.testing.assert_close(renamed.weights[:, permutation], original.weights, **CLOSE)


def _manual_score(model, image, drop, classes):
    """The score of one image with the patches ``drop`` removed as keys, without cci's code."""
    prefix = attention_adapter(model).num_prefix_tokens
    mask = key_mask(drop[None], prefix)
    with torch.no_grad():
        if isinstance(model, ClipModel):
            with attention_taps(model, record=False, logit_mask=mask):
                embedding = model(image[None])
            return float(F.cosine_similarity(embedding, TEXT[classes][None]))
        vit = model.model  # timm's own masked forward (forward_features passes attn_mask to every block)
        logits = vit.forward_head(vit.forward_features(model.pixels(image[None]), attn_mask=mask))
        return float(logits[0, classes])


def test_masked_scores_match_a_manual_recomputation(model, pixels):
    result = cci(model, pixels[:2], target_for(model, [3, 4]), seeds=[1, 2], k=4)
    for row, classes in ((0, 3), (1, 4)):
        clean = _manual_score(model, pixels[row], torch.zeros(64, dtype=torch.bool), classes)
        assert result.scores[row, 0].item() == pytest.approx(clean, abs=1e-5)
        cluster = 2
        masked = _manual_score(model, pixels[row], result.labels[row] == cluster, classes)
        assert result.scores[row, cluster + 1].item() == pytest.approx(masked, abs=1e-5)
        assert abs(masked - clean) > 1e-6
    deltas = result.scores[:, :1] - result.scores[:, 1:]
    torch.testing.assert_close(result.weights, (deltas / deltas.sum(1, keepdim=True)).float(), **CLOSE)


def test_negative_deltas_kept_or_clipped(model, pixels):
    labels = torch.randint(0, 6, (4, 64), generator=torch.Generator().manual_seed(4))
    score = resolve_score(model, target_for(model, [0, 1, 2, 3]), 4)
    kept = cluster_attribution(model, pixels, labels, score, k=6, negative="keep")
    clipped = cluster_attribution(model, pixels, labels, score, k=6, negative="clip")
    deltas = kept.scores[:, :1] - kept.scores[:, 1:]
    assert (deltas < 0).any()  # the premise: some cluster's removal raises the score
    assert (kept.weights < 0).any() and (clipped.weights >= 0).all()
    positive = deltas.clamp(min=0)
    ok = ~clipped.degenerate
    torch.testing.assert_close(clipped.weights[ok], (positive / positive.sum(1, keepdim=True)).float()[ok], **CLOSE)


def test_degenerate_and_empty_clusters(model, pixels):
    labels = torch.randint(0, 3, (2, 64), generator=torch.Generator().manual_seed(5))  # cluster 3 of 4 is empty
    score = resolve_score(model, target_for(model, [0, 1]), 2)
    result = cluster_attribution(model, pixels[:2], labels, score, k=4)
    assert (result.weights[:, 3] == 0).all() and not result.degenerate.any()
    constant = cluster_attribution(model, pixels[:2], labels, lambda outputs, index: outputs[:, 0] * 0 + 1.0, k=4)
    assert constant.degenerate.all()
    assert torch.equal(constant.map, torch.zeros(2, 8, 8)) and torch.equal(constant.weights, torch.zeros(2, 4))


def test_cluster_features(model, pixels):
    final = patch_features(model, pixels[:2], "final")
    normed = patch_features(model, pixels[:2], "final_norm")
    first = patch_features(model, pixels[:2], "input")
    for features in (final, normed, first):
        assert features.shape == (2, 64, model.width)
    norm = model.clip.visual.ln_post if isinstance(model, ClipModel) else model.model.norm
    torch.testing.assert_close(normed, norm(final))
    if not isinstance(model, ClipModel):
        vit = model.model
        expected = vit.norm_pre(vit._pos_embed(vit.patch_embed(model.pixels(pixels[:2]))))[:, vit.num_prefix_tokens :]
        torch.testing.assert_close(first, expected)
    assert not torch.allclose(final, first)


def test_bad_arguments_fail_clearly(model, pixels):
    target = target_for(model, [0, 1])
    with pytest.raises(ValueError, match="need one per image"):
        cci(model, pixels[:2], target, seeds=[1])
    with pytest.raises(ValueError, match=r"k must be an integer in 1\.\.64"):
        cci(model, pixels[:2], target, seeds=[1, 2], k=65)
    with pytest.raises(ValueError, match="cluster_on must be one of"):
        cci(model, pixels[:2], target, seeds=[1, 2], cluster_on="middle")
    with pytest.raises(ValueError, match="negative must be 'keep'"):
        cci(model, pixels[:2], target, seeds=[1, 2], negative="abs")


def test_cci_runs_under_inference_mode(model, pixels):
    """Evaluation actors score under torch.inference_mode() (spec §0.5): CCI needs no autograd."""
    reference = cci(model, pixels[:2], target_for(model, [0, 1]), seeds=[10, 11], k=5)
    with torch.inference_mode():
        result = cci(model, pixels[:2].clone(), target_for(model, [0, 1]), seeds=[10, 11], k=5)
    assert torch.equal(result.labels, reference.labels)
    torch.testing.assert_close(result.map, reference.map, **CLOSE)
