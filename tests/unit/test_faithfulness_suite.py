"""The ``faithfulness`` suite's scorer and aggregation, without Ray: every method is scored on the same curves'
seeds, rows do not depend on the batch they came in, and the metrics are the rows' means."""

from __future__ import annotations

import io

import numpy as np
import pytest

from robustfm.config import ConfigError

METHODS = ["cci", "gae", "rollout", "attn_gradcam", "gradcam", "input_gradient", "attnlrp", "random"]


def _png(seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _params(**changes):
    params = {
        "class_names": ["cat", "dog", "car"],
        "index_of": {0: 0, 1: 1, 2: 2},
        "templates": ["a photo of a {}."],
        "methods": METHODS,
        "modes": ["deletion", "insertion"],
        "fraction_per_step": 0.1,
        "steps": 5,
        "canvas": 0.0,
        "target": "label",
        "cci_k": 4,
        "cci_cluster_on": "final",
        "cci_negative": "keep",
        "forward_batch_size": 16,
    }
    return {**params, **changes}


def _batch(ids, labels):
    return {
        "id": np.asarray(ids, dtype=object),
        "image": np.asarray([_png(int(i[-1])) for i in ids], dtype=object),
        "label": np.asarray(labels),
    }


@pytest.fixture(scope="module")
def timm_scorer():
    from robustfm.evals.model_ref import ModelRef
    from robustfm.evals.suites.faithfulness import FaithfulnessScorer

    return FaithfulnessScorer(ModelRef("timm/tiny-vit"), _params(), seed=3)


def test_every_method_starts_from_the_same_clean_image_and_canvas(timm_scorer):
    import torch

    out = timm_scorer(_batch(["img0", "img1", "img2"], [0, 1, 2]))
    assert len(out["id"]) == 3 * len(METHODS) * 2 and set(out["status"]) == {"ok"}
    for sample in ("img0", "img1", "img2"):
        for mode in ("deletion", "insertion"):
            rows = (out["id"] == sample) & (out["mode"] == mode)
            starts = out["curve_prob"][rows][:, 0]
            assert np.ptp(starts) == 0, (sample, mode, starts)  # step 0 is the same image whatever the map
    # Deletion's step 0 is the clean image: its probability is the model's own softmax of the label.
    from robustfm.evals.data import decode_batch

    pixels, _ = decode_batch(_batch(["img1"], [1])["image"], ["img1"], timm_scorer.model.image_size)
    with torch.no_grad():
        prob = timm_scorer.model(torch.from_numpy(pixels)).softmax(1)[0, 1]
    first = out["curve_prob"][(out["id"] == "img1") & (out["mode"] == "deletion")][0, 0]
    assert first == pytest.approx(float(prob), abs=1e-5)
    # The maps differ between methods, so their curves do too (beyond step 0).
    deletion = out["mode"] == "deletion"
    ends = {m: out["auc_prob"][deletion & (out["method"] == m)] for m in METHODS}
    assert len({tuple(np.round(v, 6)) for v in ends.values()}) > 2


def test_rows_do_not_depend_on_the_batch_they_came_in(timm_scorer):
    together = timm_scorer(_batch(["img4", "img5"], [2, 0]))
    alone = timm_scorer(_batch(["img5"], [0]))
    mine = together["id"] == "img5"
    for column in ("method", "mode", "auc_prob", "auc_top1", "curve_prob"):
        expected = alone[column]
        got = together[column][mine]
        if expected.dtype == object:
            assert list(got) == list(expected)
        else:
            np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=column)


def test_unlabelled_rows_are_not_explained_and_prediction_targets_follow_the_model(timm_scorer):
    import torch

    from robustfm.evals.model_ref import ModelRef
    from robustfm.evals.suites.faithfulness import FaithfulnessScorer

    out = timm_scorer(_batch(["img6", "img7"], [-1, 1]))
    assert set(out["id"]) == {"img7"}
    predicted = FaithfulnessScorer(ModelRef("timm/tiny-vit"), _params(target="prediction", methods=["random"]), seed=3)
    out = predicted(_batch(["img8"], [0]))
    from robustfm.evals.data import decode_batch

    pixels, _ = decode_batch(_batch(["img8"], [0])["image"], ["img8"], predicted.model.image_size)
    with torch.no_grad():
        logits = predicted.model(torch.from_numpy(pixels))  # the whole head: a prediction may be any class
    assert set(out["target"]) == {int(logits.argmax())}


def test_clip_models_are_explained_through_their_zero_shot_classifier():
    from robustfm.evals.model_ref import ModelRef
    from robustfm.evals.suites.faithfulness import FaithfulnessScorer

    scorer = FaithfulnessScorer(ModelRef("open_clip/tiny-vit"), _params(methods=["cci", "gae"]), seed=0)
    out = scorer(_batch(["img0", "img1"], [0, 2]))
    assert len(out["id"]) == 2 * 2 * 2
    probabilities = out["curve_prob"]
    assert np.all((probabilities > 0) & (probabilities < 1))
    assert not np.all(out["degenerate"][out["method"] == "cci"])


def test_k_beyond_the_patches_fails_in_the_actor():
    from robustfm.evals.model_ref import ModelRef
    from robustfm.evals.suites.faithfulness import FaithfulnessScorer

    with pytest.raises(ValueError, match="cci_k = 65 exceeds the model's 64 patches"):
        FaithfulnessScorer(ModelRef("timm/tiny-vit"), _params(cci_k=65), seed=0)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"fraction_per_step": 0.02, "steps": 60}, "fraction_per_step"),
        ({"cci_k": 1}, "cci_k"),
        ({"modes": ("deletion", "erase")}, "modes"),
        ({"canvas": 2.0}, "canvas"),
    ],
)
def test_bad_settings_fail_at_config_time_naming_the_field(changes, field):
    from robustfm.evals.suites.faithfulness import FaithfulnessConfig

    with pytest.raises(ConfigError, match=field):
        FaithfulnessConfig(**changes)


def test_aggregate_reports_each_methods_mean_auc_and_one_plot_per_mode():
    from robustfm.evals.config import EvalConfig
    from robustfm.evals.suites.faithfulness import FaithfulnessSuite

    rng = np.random.default_rng(0)
    n = 4
    rows = {"id": [], "method": [], "mode": [], "degenerate": []}
    rows.update({f"auc_{c}": [] for c in ("prob", "top1", "top5")})
    rows.update({f"curve_{c}": [] for c in ("prob", "top1", "top5")})
    for sample in range(n):
        for method in ("cci", "random"):
            for mode in ("deletion", "insertion"):
                rows["id"].append(f"s{sample}")
                rows["method"].append(method)
                rows["mode"].append(mode)
                rows["degenerate"].append(int(method == "cci" and sample == 0))
                for curve in ("prob", "top1", "top5"):
                    rows[f"auc_{curve}"].append(rng.random())
                    rows[f"curve_{curve}"].append(rng.random(3))
    rows = {k: np.asarray(v, dtype=object if k in ("id", "method", "mode") else None) for k, v in rows.items()}
    params = {"methods": ["cci", "random"], "modes": ["deletion", "insertion"], "fraction_per_step": 0.1, "steps": 2}
    output = FaithfulnessSuite(EvalConfig()).aggregate(rows, params)
    chosen = (rows["method"] == "cci") & (rows["mode"] == "insertion")
    assert output.metrics.values["insertion/cci/auc_top5"] == pytest.approx(rows["auc_top5"][chosen].mean())
    assert output.metrics.directions()["deletion/cci/auc_top1"] == "lower"
    assert output.metrics.directions()["insertion/random/auc_prob"] == "higher"
    assert output.metrics.values["cci/degenerate"] == pytest.approx(1 / n)
    assert [plot.name for plot in output.plots] == ["deletion_curves", "insertion_curves"]
    assert output.plots[0].series["random"][0] == pytest.approx([0.0, 0.1, 0.2])
    columns = FaithfulnessSuite.summary_columns(params)
    assert columns["deletion AUC@1 (cci)"] == "deletion/cci/auc_top1"
