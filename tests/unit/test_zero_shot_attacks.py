"""Zero-shot robust accuracy without Ray: the fixed hashed subset, robust = classified right and never flipped (a
vanishing radius keeps clean accuracy, a large one drives it to 0), per-image seeds (a batch gives its rows' results),
APGD-T's targeted DLR loss against a hand computation, and config errors that name the field."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robustfm.attacks import OBJECTIVES
from robustfm.config import ConfigError
from robustfm.evals.suites.zero_shot import ZeroShotConfig
from robustfm.evals.zero_shot_attacks import attack_rows, attack_subset, condition

CLASSES = ("cat", "dog", "car", "boat")


def test_the_subset_is_fixed_by_the_ids_alone():
    ids = [f"img-{i}" for i in range(40)]
    labels = [i % 4 if i % 7 else -1 for i in range(40)]
    subset = attack_subset(ids, labels, 10)
    assert len(subset) == 10 and subset == sorted(subset)
    assert all(labels[ids.index(i)] >= 0 for i in subset)  # unlabelled images are never attacked
    assert attack_subset(ids[::-1], labels[::-1], 10) == subset  # order does not matter
    assert set(attack_subset(ids[:30], labels[:30], None)) == {
        i for i, y in zip(ids[:30], labels[:30], strict=True) if y >= 0
    }
    assert set(attack_subset(ids, labels, 10)) <= set(attack_subset(ids, labels, 20))  # a prefix of one ranking


@pytest.fixture(scope="module")
def zero_shot():
    from robustfm.models import create_model

    torch.manual_seed(0)
    model = create_model("open_clip/tiny-vit").eval().requires_grad_(False)
    with torch.no_grad():
        text = model.encode_text([f"a photo of a {c}" for c in CLASSES], normalize=True).float()
    images = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        scale = model.logit_scale.exp()
        predicted = (scale * F.normalize(model.encode_image(images), dim=-1) @ text.T).argmax(1)
    labels = [int(p) for p in predicted[:4]] + [(int(p) + 1) % 4 for p in predicted[4:]]  # 4 right, 2 wrong
    return model, text, images, [f"id-{i}" for i in range(6)], labels


def _params(eps, attacks=("apgd_ce",), ids=None, steps=10):
    return {
        "attacks": list(attacks),
        "attack_norm": "linf",
        "attack_eps": list(eps),
        "attack_steps": steps,
        "attack_restarts": 1,
        "attack_target_classes": 3,
        "attack_ids": ids if ids is not None else [f"id-{i}" for i in range(6)],
    }


def test_robust_means_right_and_never_flipped(zero_shot):
    model, text, images, ids, labels = zero_shot
    rows = attack_rows(
        model, text, images, ids, labels, _params([1e-7, 0.5], ("apgd_ce", "apgd_t"), steps=4), 0, "fp32"
    )
    by = {(r["condition"], r["id"]): r for r in rows}
    for attack in ("apgd_ce", "apgd_t", "attacks"):
        tiny, large = condition(attack, "linf", 1e-7), condition(attack, "linf", 0.5)
        assert [by[tiny, i]["robust"] for i in ids] == [1, 1, 1, 1, 0, 0]  # = clean correctness
        assert [by[large, i]["robust"] for i in ids] == [0] * 6
        assert all(by[large, i]["attack_failed"] == 0 for i in ids)
    assert {r["condition"] for r in rows} == {condition(a, "linf", e) for a in ("apgd_ce", "apgd_t", "attacks")
                                               for e in (1e-7, 0.5)}  # fmt: skip


def test_only_subset_rows_are_attacked_and_a_row_gets_its_own_result_in_any_batch(zero_shot):
    model, text, images, ids, labels = zero_shot
    params = _params([8 / 255], ids=["id-1", "id-2", "id-5"], steps=5)
    whole = attack_rows(model, text, images, ids, labels, params, 4, "fp32")
    assert sorted({r["id"] for r in whole}) == ["id-1", "id-2", "id-5"]
    part = attack_rows(model, text, images[1:3], ids[1:3], labels[1:3], params, 4, "fp32")
    for row in part:
        twin = next(r for r in whole if (r["id"], r["condition"]) == (row["id"], row["condition"]))
        assert row["robust"] == twin["robust"]
        torch.testing.assert_close(torch.from_numpy(row["logits"]), torch.from_numpy(twin["logits"]), atol=1e-4, rtol=0)


def test_the_targeted_dlr_loss_equals_a_hand_computation():
    dlr = OBJECTIVES.get("dlr_targeted")
    logits = torch.tensor([[3.0, 1.0, 0.5, -1.0, 2.0]])
    target = {"labels": torch.tensor([0]), "target_labels": torch.tensor([4])}
    expected = -(3.0 - 2.0) / (3.0 - 0.5 * (1.0 + 0.5))  # sorted: 3, 2, 1, 0.5, -1: pi1 = 3, pi3 = 1, pi4 = 0.5
    assert dlr.loss(logits, target).item() == pytest.approx(expected)
    assert dlr.success(logits, target).tolist() == [False]
    with pytest.raises(ValueError, match="at least 4 classes"):
        dlr.loss(logits[:, :3], target | {"target_labels": torch.tensor([1])})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("attacks", ("apgd",)),
        ("attacks", ("apgd_ce", "apgd_ce")),
        ("attack_eps", ()),
        ("attack_eps", (0.0,)),
        ("attack_steps", 0),
        ("attack_samples", 0),
        ("attack_target_classes", 0),
    ],
)
def test_bad_attack_settings_name_the_field(field, value):
    with pytest.raises(ConfigError) as err:
        ZeroShotConfig(**{field: value})
    assert err.value.field == field
