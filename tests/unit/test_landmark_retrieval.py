"""Revisited Oxford/Paris without Ray: revisitop's AP with its junk rule against a brute force written out here, the
restricted unpickler, the listing, and what ``--suite all`` runs."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from robustfm.data.safe_pickle import UnsafePickleError, load_plain_pickle
from robustfm.data.shards import Location
from robustfm.data.sources import SOURCES, LayoutError
from robustfm.evals.metrics import revisited_average_precision
from robustfm.testing.retrieval import make_revisitop_tree


def brute_force_ap(ranking, positives, junk) -> float:
    """Walk the ranking with junk deleted; each positive adds the mean of the precision just before and at it."""
    kept = [item for item in ranking if item not in set(junk)]
    found, ap = 0, 0.0
    for rank, item in enumerate(kept):
        if item in set(positives):
            before = 1.0 if rank == 0 else found / rank
            found += 1
            ap += (before + found / (rank + 1)) / 2 / len(positives)
    return ap


def test_hand_computed_average_precision():
    # positives at ranks 0 and 2: (1 + 1)/2 * 1/2 + (1/2 + 2/3)/2 * 1/2
    assert revisited_average_precision([7, 3, 9], [7, 9], []) == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)
    # junk at rank 0 moves the positive up to rank 0: a perfect AP
    assert revisited_average_precision([5, 7, 3], [7], [5]) == pytest.approx(1.0)
    assert np.isnan(revisited_average_precision([1, 2], [], [1]))


@pytest.mark.parametrize("seed", range(5))
def test_medium_and_hard_map_match_a_brute_force(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        ranking = rng.permutation(30)
        easy, hard, junk = np.split(rng.permutation(30)[:12], [4, 8])
        medium = revisited_average_precision(ranking, np.r_[easy, hard], junk)
        assert medium == pytest.approx(brute_force_ap(ranking, np.r_[easy, hard], junk))
        hard_ap = revisited_average_precision(ranking, hard, np.r_[junk, easy])
        assert hard_ap == pytest.approx(brute_force_ap(ranking, hard, np.r_[junk, easy]))


def test_plain_data_pickles_load_and_others_are_refused_naming_the_class():
    data = {"imlist": ["a"], "gnd": [{"easy": np.array([0, 2]), "bbx": [1.0, 2.0, 3.0, 4.0]}]}
    loaded = load_plain_pickle(pickle.dumps(data, protocol=2))
    assert loaded["imlist"] == ["a"] and loaded["gnd"][0]["easy"].tolist() == [0, 2]

    class Payload:
        def __reduce__(self):
            return (print, ("this would run",))

    with pytest.raises(UnsafePickleError, match=r"gnd_x.pkl: refused to load builtins.print"):
        load_plain_pickle(pickle.dumps({"gnd": Payload()}), "gnd_x.pkl")


def test_revisitop_listing_and_a_bad_ground_truth(tmp_path):
    tree = make_revisitop_tree(tmp_path / "r", landmarks=2, size=16)
    listing = SOURCES.get("revisitop")(Location(str(tree.root)), ())
    assert [i.id for i in listing.splits["database"]] == tree.ground_truth["imlist"]
    assert [i.path for i in listing.splits["query"]] == ["jpg/q0.jpg", "jpg/q1.jpg"]

    class Payload:
        def __reduce__(self):
            return (print, ("this would run",))

    (tree.root / "gnd_rtiny.pkl").write_bytes(pickle.dumps({**tree.ground_truth, "extra": Payload()}))
    with pytest.raises(UnsafePickleError, match="refused to load builtins.print"):
        SOURCES.get("revisitop")(Location(str(tree.root)), ())
    (tree.root / "gnd_rtiny.pkl").write_bytes(pickle.dumps({"imlist": []}))
    with pytest.raises(LayoutError, match=r"lacks the key\(s\) \['qimlist', 'gnd'\]"):
        SOURCES.get("revisitop")(Location(str(tree.root)), ())


def test_suite_all_leaves_out_suites_without_their_shards_and_the_config_needs_the_ground_truth():
    from robustfm.config import ConfigError
    from robustfm.evals.config import EvalConfig, EvalDataConfig
    from robustfm.evals.runner import runnable_suites
    from robustfm.evals.suites.landmark_retrieval import LandmarkRetrievalConfig

    runnable = runnable_suites(EvalConfig())
    assert "landmark_retrieval" not in runnable and "knn_detection" not in runnable and "two_afc" in runnable
    with pytest.raises(ConfigError, match="ground_truth: must name the gnd_<name>.pkl"):
        LandmarkRetrievalConfig(data=EvalDataConfig(shards="/data/roxford5k/shards"))


def test_a_recipe_points_its_milestone_suites_at_its_data_but_not_suites_with_data_of_their_own():
    from robustfm.evals.config import EvalConfig
    from robustfm.recipes.milestones import with_eval_data

    cfg = with_eval_data(EvalConfig(), "/runs/demo/shards", "val", 24)
    assert cfg.suites["zero_shot"].data.shards == "/runs/demo/shards" and cfg.suites["zero_shot"].data.split == "val"
    assert cfg.suites["landmark_retrieval"].data.shards is None  # would need its ground truth: left alone
    assert cfg.suites["knn_detection"].data.shards is None
