"""The ``two_afc`` suite on generated NIGHTS and BAPPS trees converted by ``prepare_data``, with 2 gradient-capable
actors: rows the converter could not read are skipped and named, near copies are found whichever side they are on,
the reported numbers are those of the scored rows, robust accuracy never exceeds clean and equals it at a tiny radius,
and ``jobs/evaluate.py --suite two_afc`` runs on the shards."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from robustfm.data.config import PrepareConfig, SourceConfig
from robustfm.data.prepare import run as prepare
from robustfm.data.shards import Location, load_manifest
from robustfm.testing.two_afc import make_bapps_tree, make_nights_tree

pytestmark = [pytest.mark.ray]
TINY = 1e-7


def _shards(tree, kind: str, out) -> str:
    source = SourceConfig(kind=kind, root=str(tree.root))
    config = PrepareConfig(source=source, output=str(out), shard_size=4, progress=False)
    prepare(config)
    return str(out)


def _eval_config(shards: str, split: str, out, threats, samples=None):
    from robustfm.evals.config import ActorPoolConfig, EvalConfig, EvalDataConfig, SuiteSettings
    from robustfm.evals.suites.two_afc import Threat, TwoAFCConfig

    section = TwoAFCConfig(
        data=EvalDataConfig(shards=shards, split=split),
        threats=tuple(Threat(norm, eps) for norm, eps in threats),
        attack_steps=4,
        attack_samples=samples,
    )
    pool = ActorPoolConfig(min_actors=2, max_actors=2, batch_size=4, wait_for_min_actors_s=60, num_cpus=0.5)
    return EvalConfig(seed=2, output_dir=str(out), pool=pool, suites=SuiteSettings.build({"two_afc": section}))


@pytest.mark.timeout(600)
def test_nights_clean_and_attacked_with_two_actors(ray_session, tmp_path):
    from robustfm.evals.runner import run_suite

    tree = make_nights_tree(tmp_path / "nights", per_split=8, size=48)
    shards = _shards(tree, "nights", tmp_path / "shards")
    manifest = load_manifest(Location(shards))
    assert Counter(s["reason"] for s in manifest["skipped"]) == Counter(tree.dropped.values())
    assert manifest["columns"]["p_right"]["kind"] == "float"

    threats = [("linf", TINY), ("linf", 8 / 255)]
    cfg = _eval_config(shards, "test", tmp_path / "eval", threats, samples=3)
    result = run_suite("two_afc", "open_clip/tiny-vit", cfg, keep_rows=True)
    rows, metrics = result.rows, result.metrics

    kept = {i for i in tree.near_side if i in set(rows["id"])}
    assert result.counts["scored"] == len(kept) == 8  # the test split's kept triplets, every one scored
    clean = rows["condition"] == "clean"
    # Near copies are found on either side (sides were drawn at random).
    assert {int(v) for v in rows["p_right"][clean]} == {0, 1}
    assert metrics["clean/all/accuracy"] >= 0.85
    # The reported numbers are those of the scored rows, computed here without the suite's code.
    picks_right = rows["sim_right"][clean] > rows["sim_left"][clean]
    by_hand = picks_right == (rows["p_right"][clean] > 0.5)
    assert metrics["clean/all/accuracy"] == pytest.approx(by_hand.mean())
    subsets = rows["subset"][clean]
    per_subset = {s: by_hand[subsets == s].mean() for s in ("imagenet", "no_imagenet")}
    for subset, value in per_subset.items():
        assert metrics[f"clean/{subset}/accuracy"] == pytest.approx(value)
    assert metrics["clean/mean_over_subsets/accuracy"] == pytest.approx(np.mean(list(per_subset.values())))

    # 3 attacked triplets per subset; robust <= clean per triplet, and equal to it at a radius of 1e-7.
    attacked = set(result.params["attack_ids"])
    assert len(attacked) == 6
    clean_correct = dict(zip(rows["id"][clean], by_hand, strict=True))
    for name in (f"apgd_linf:{TINY:g}", f"apgd_linf:{8 / 255:g}"):
        mask = rows["condition"] == name
        assert set(rows["id"][mask]) == attacked
        for sample, robust in zip(rows["id"][mask], rows["correct"][mask], strict=True):
            assert robust <= clean_correct[sample]
            if name.endswith(f"{TINY:g}"):
                assert robust == clean_correct[sample]
    assert metrics[f"apgd_linf:{8 / 255:g}/all/robust_accuracy"] <= metrics[f"apgd_linf:{TINY:g}/all/robust_accuracy"]
    protocol = result.protocol["params"]["resolved"]
    assert "a tie decides left" in protocol["tie_rule"] and protocol["attack_subset"]["num_samples"] == 6


@pytest.mark.timeout(600)
def test_bapps_soft_score_and_lpips(ray_session, tmp_path):
    from robustfm.evals.runner import run_suite

    tree = make_bapps_tree(tmp_path / "bapps", per_subset=5, size=32)
    shards = _shards(tree, "bapps", tmp_path / "shards")
    assert [s["reason"] for s in load_manifest(Location(shards))["skipped"]] == ["unpaired"]

    result = run_suite("two_afc", "open_clip/tiny-vit", _eval_config(shards, "val", tmp_path / "e", []), keep_rows=True)
    rows, metrics = result.rows, result.metrics
    assert result.counts["scored"] == 10 and set(rows["condition"]) == {"clean"}
    d_left, d_right, p = 1 - rows["sim_left"], 1 - rows["sim_right"], rows["p_right"]
    soft = np.where(d_left < d_right, 1 - p, np.where(d_right < d_left, p, 0.5))
    assert metrics["clean/all/soft_score"] == pytest.approx(soft.mean())
    for subset in ("cnn", "traditional"):
        assert metrics[f"clean/{subset}/soft_score"] == pytest.approx(soft[rows["subset"] == subset].mean())

    # LPIPS (random trunk offline, its shipped heads) as the 2AFC metric, clean and with the reference attacked.
    lpips_cfg = _eval_config(shards, "val", tmp_path / "l", [("linf", 8 / 255)], samples=2)
    by_lpips = run_suite("two_afc", "lpips/alex", lpips_cfg, keep_rows=True)
    clean = by_lpips.rows["condition"] == "clean"
    assert by_lpips.counts["scored"] == 10 and bool((by_lpips.rows["sim_left"][clean] <= 0).all())  # minus distances
    attacked = by_lpips.rows["condition"] == f"apgd_linf:{8 / 255:g}"
    assert attacked.sum() == 4 and 0 <= by_lpips.metrics[f"apgd_linf:{8 / 255:g}/all/robust_accuracy"] <= 1
    assert by_lpips.protocol["model"]["name"] == "lpips/alex"


@pytest.mark.timeout(600)
def test_the_evaluate_job_runs_2afc_knn_and_landmark_suites_with_two_actors(ray_session, tmp_path):
    import importlib.util

    from robustfm.testing.retrieval import make_revisitop_tree, make_safety_folder

    triplets = _shards(make_bapps_tree(tmp_path / "bapps", per_subset=3, size=32), "bapps", tmp_path / "s2afc")
    folder = make_safety_folder(tmp_path / "folder", per_class=6, size=32)
    knn = tmp_path / "sknn"
    prepare(PrepareConfig(source=SourceConfig(kind="image_folder", root=str(folder)), output=str(knn), progress=False))
    tree = make_revisitop_tree(tmp_path / "roxford", landmarks=3, size=32)
    landmarks = tmp_path / "sland"
    prepare(
        PrepareConfig(source=SourceConfig(kind="revisitop", root=str(tree.root)), output=str(landmarks), progress=False)
    )

    spec = importlib.util.spec_from_file_location("evaluate_job", "jobs/evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    argv = [
        "--suite", "two_afc", "knn_detection", "landmark_retrieval", "--model", "open_clip/tiny-vit",
        "tracking.backend=none", f"eval.output_dir={tmp_path / 'job'}", "eval.pool.max_actors=2",
        "eval.pool.batch_size=4",
        f"eval.suites.two_afc.data.shards={triplets}", "eval.suites.two_afc.data.split=val",
        "eval.suites.two_afc.attack_steps=2", "eval.suites.two_afc.attack_samples=1",
        f"eval.suites.knn_detection.data.shards={knn}", "eval.suites.knn_detection.data.split=train",
        "eval.suites.knn_detection.pool_per_class=2", "eval.suites.knn_detection.queries_per_class=2",
        "eval.suites.knn_detection.target_images=2", "eval.suites.knn_detection.attack_steps=2",
        f"eval.suites.landmark_retrieval.data.shards={landmarks}",
        f"eval.suites.landmark_retrieval.ground_truth={tree.root / 'gnd_rtiny.pkl'}",
        "eval.suites.landmark_retrieval.attack_steps=2",
    ]  # fmt: skip
    assert job.main(argv) == 0
    for suite in ("two_afc", "knn_detection", "landmark_retrieval"):
        (table,) = (tmp_path / "job").rglob(f"{suite}/table.csv")
        assert table.stat().st_size > 0
    (report,) = (tmp_path / "job" / "report").glob("*/report.md")
    text = report.read_text()
    assert "| model | 2AFC clean | 2AFC linf 0.01569 | 2AFC l2 3 |" in text  # paper 003 Table I's shape
    assert "| model | medium clean | hard clean |" in text and "unsafe detected, clean" in text
