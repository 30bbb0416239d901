"""2AFC without Ray: the NIGHTS and BAPPS listings (unanimous votes, pairing by stem, bad layouts named), the accuracy
and soft score against a per-triplet computation written out here, the attacked subset, and the attack that moves the
reference only, inside its ball."""

from __future__ import annotations

import csv
import pickle

import numpy as np
import pytest

from robustfm.data.shards import Location
from robustfm.data.sources import SOURCES, LayoutError
from robustfm.evals.metrics import two_afc_correct, two_afc_soft_score
from robustfm.testing.two_afc import make_bapps_tree, make_nights_tree


def _listing(kind: str, root, splits=()):
    return SOURCES.get(kind)(Location(str(root)), splits)


def test_nights_keeps_unanimous_triplets_with_their_side_and_subset(tmp_path):
    tree = make_nights_tree(tmp_path / "nights", per_split=4, size=32)
    listing = _listing("nights", tree.root)

    assert sorted(listing.splits) == ["test", "train", "val"]
    assert listing.classes == ("imagenet", "no_imagenet")
    items = {item.id: item for split in listing.splits.values() for item in split}
    assert {i: dict(item.extra)["p_right"] for i, item in items.items() if i in tree.near_side} == {
        i: float(side) for i, side in tree.near_side.items()
    }
    few = [i for i, reason in tree.dropped.items() if reason == "votes_below_6"]
    assert [s["reason"] for s in listing.skipped] == ["votes_below_6"] and few[0] in listing.skipped[0]["detail"]
    assert not set(few) & set(items)
    # Rows with a missing or corrupt file are listed; the converter skips them (tests/ray/test_two_afc_suite.py).
    assert {i for i, r in tree.dropped.items() if r != "votes_below_6"} <= set(items)
    for item in items.values():
        extra = dict(item.extra)
        assert extra["left"].endswith("_0.png") and extra["right"].endswith("_1.png")
        assert item.class_name == listing.classes[item.label]
    assert sorted(_listing("nights", tree.root, ("test",)).splits) == ["test"]


def test_nights_table_lacking_a_column_is_refused_naming_it(tmp_path):
    tree = make_nights_tree(tmp_path / "nights", per_split=1, size=16)
    table = tree.root / "data.csv"
    rows = list(csv.reader(table.open()))
    with table.open("w", newline="") as handle:
        csv.writer(handle).writerows([row[:-1] for row in rows])  # drop "votes"
    with pytest.raises(LayoutError, match=r"lacks the column\(s\) \['votes'\]"):
        _listing("nights", tree.root)
    with pytest.raises(LayoutError, match="data.csv does not exist"):
        _listing("nights", tmp_path)


def test_nights_unknown_split_is_refused(tmp_path):
    tree = make_nights_tree(tmp_path / "nights", per_split=1, size=16)
    with pytest.raises(LayoutError, match=r"has no split \['test_imagenet'\]"):
        _listing("nights", tree.root, ("test_imagenet",))


def test_bapps_pairs_by_stem_and_names_the_unpaired_one(tmp_path):
    tree = make_bapps_tree(tmp_path / "bapps", per_subset=4, size=16)
    listing = _listing("bapps", tree.root)

    assert listing.classes == ("cnn", "traditional")
    items = listing.splits["val"]
    assert sorted(item.id for item in items) == sorted(tree.near_side)
    for item in items:
        stem = item.id.rsplit("/", 1)[1]
        extra = dict(item.extra)
        assert item.path.endswith(f"ref/{stem}.png")
        assert extra["left"].endswith(f"p0/{stem}.png") and extra["right"].endswith(f"p1/{stem}.png")
        assert (extra["p_right"] > 0.5) == bool(tree.near_side[item.id])
    (unpaired,) = listing.skipped
    assert (
        unpaired["reason"] == "unpaired"
        and "'000000a'" in unpaired["detail"]
        and "['p1', 'judge']" in unpaired["detail"]
    )


def test_bapps_bad_layouts_fail_naming_the_folder(tmp_path):
    tree = make_bapps_tree(tmp_path / "bapps", per_subset=1, size=16)
    (tree.root / "2afc" / "val" / "cnn" / "judge").rename(tree.root / "judged")
    with pytest.raises(LayoutError, match=r"2afc/val/cnn lacks the folder\(s\) \['judge'\]"):
        _listing("bapps", tree.root)
    (tree.root / "judged").rename(tree.root / "2afc" / "val" / "cnn" / "judge")
    (tree.root / "2afc" / "val" / "blur").mkdir()
    with pytest.raises(LayoutError, match=r"unknown subset folder\(s\) \['blur'\]"):
        _listing("bapps", tree.root)


def test_bapps_judgement_holding_a_pickle_is_refused_and_named(tmp_path):
    tree = make_bapps_tree(tmp_path / "bapps", subsets=("cnn",), per_subset=2, size=16)
    judge = tree.root / "2afc" / "val" / "cnn" / "judge" / "000001.npy"
    np.save(judge, np.array([{"p": 0.9}], dtype=object), allow_pickle=True)  # an object array: loading runs pickle
    pickled = tree.root / "2afc" / "val" / "cnn" / "judge" / "000000.npy"
    pickled.write_bytes(pickle.dumps(0.9))
    listing = _listing("bapps", tree.root)
    reasons = {s["path"].rsplit("/", 1)[1]: s["reason"] for s in listing.skipped}
    assert reasons == {"000000.npy": "bad_judgement", "000001.npy": "bad_judgement", "000000a.png": "unpaired"}
    assert listing.splits["val"] == []


def test_accuracy_and_soft_score_match_a_per_triplet_computation_with_ties():
    rng = np.random.default_rng(0)
    d_left = rng.choice([0.1, 0.2, 0.3], size=200)  # few values: many exact ties
    d_right = rng.choice([0.1, 0.2, 0.3], size=200)
    p = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], size=200)
    expected_soft, expected_correct = [], []
    for dl, dr, share in zip(d_left, d_right, p, strict=True):
        if dl < dr:
            expected_soft.append(1 - share)  # the model picks left: the judges who picked left agree
        elif dr < dl:
            expected_soft.append(share)
        else:
            expected_soft.append(0.5)
        picks_right = (1 - dr) > (1 - dl)  # cosines; a tie picks left
        expected_correct.append(picks_right == (share > 0.5))
    np.testing.assert_allclose(two_afc_soft_score(d_left, d_right, p), expected_soft)
    assert two_afc_correct(1 - d_left, 1 - d_right, p).tolist() == expected_correct
    assert (d_left == d_right).sum() > 20 and (p == 0.5).sum() > 20  # the ties were exercised


def test_the_attacked_subset_is_per_subset_and_independent_of_order():
    from robustfm.evals.suites.two_afc import attacked_per_subset

    ids = [f"id{i}" for i in range(20)]
    subsets = ["a" if i % 3 else "b" for i in range(20)]
    chosen = attacked_per_subset(ids, subsets, 3)
    assert len(chosen) == 6 and sum(subsets[ids.index(i)] == "b" for i in chosen) == 3
    assert attacked_per_subset(ids[::-1], subsets[::-1], 3) == chosen
    assert attacked_per_subset(ids, subsets, None) == sorted(ids)


@pytest.mark.parametrize("norm,eps", [("linf", 4 / 255), ("l2", 0.5)])
def test_the_attack_moves_the_reference_only_and_stays_in_its_ball(norm, eps):
    import torch

    from robustfm.attacks import AttackConfig, apgd
    from robustfm.models import create_model

    torch.manual_seed(0)
    model = create_model("open_clip/tiny-vit").eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    reference = torch.rand(4, 3, model.image_size, model.image_size, generator=generator)
    with torch.no_grad():
        left = model.encode_image(torch.rand(reference.shape, generator=generator)).float()
        right = model.encode_image(reference.flip(-1)).float()
    before = (left.clone(), right.clone())
    target = {"left": left, "right": right, "labels": torch.tensor([1, 1, 0, 0])}
    config = AttackConfig(norm=norm, eps=eps, steps=5, objective="two_afc")
    result = apgd(model.encode_image, reference, target, config, row_seeds=[0, 1, 2, 3], eval_modules=model)

    assert torch.equal(target["left"], before[0]) and torch.equal(target["right"], before[1])
    delta = (result.x_adv - reference).flatten(1)
    size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
    assert bool((size <= eps + 1e-6).all()) and bool((size > 0).any())
    assert float(result.x_adv.min()) >= 0 and float(result.x_adv.max()) <= 1


def test_lpips_is_a_distance_with_its_shipped_heads_and_refuses_to_embed():
    import torch

    from robustfm.evals.model_ref import parse_model_ref
    from robustfm.models import create_model

    torch.manual_seed(0)
    metric = create_model("lpips/alex")
    assert metric.image_size == 64 and create_model("lpips/vgg:96").image_size == 96
    a = torch.rand(3, 3, 64, 64)
    near = (a + 0.02 * torch.randn_like(a)).clamp(0, 1)
    far = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(metric.pair_distance(a, a), torch.zeros(3))
        assert bool((metric.pair_distance(a, near) < metric.pair_distance(a, far)).all())
    import lpips

    heads = torch.load(f"{lpips.__path__[0]}/weights/v0.1/alex.pth", map_location="cpu", weights_only=True)
    assert torch.equal(metric.metric.state_dict()["lin0.model.1.weight"], heads["lin0.model.1.weight"])
    with pytest.raises(TypeError, match="lpips/alex is a distance between two images"):
        metric.encode_image(a)
    assert parse_model_ref("lpips/alex").label == "lpips/alex"
    with pytest.raises(KeyError, match="did you mean 'alex'"):
        create_model("lpips/alx")
