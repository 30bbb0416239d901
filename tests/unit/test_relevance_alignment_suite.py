"""The ``relevance_alignment`` suite without Ray: PA / mIoU / mAP against sklearn on random maps and masks, set-level
accumulation, bad masks skipped by reason, rows independent of batching, both geometries, and the settings checks."""

from __future__ import annotations

import io

import numpy as np
import pytest

from robustfm.config import ConfigError


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _random_maps_and_masks(seed: int, n: int = 5, size: int = 12, levels: int | None = None):
    rng = np.random.default_rng(seed)
    maps = rng.random((n, size, size))
    if levels is not None:
        maps = np.round(maps * levels) / levels  # ties: many pixels share a score
    masks = np.zeros((n, size, size), dtype=np.float32)
    for i in range(n):  # a random rectangle per image, never empty nor full
        top, left = rng.integers(0, size // 2, 2)
        masks[i, top : top + rng.integers(2, size // 2), left : left + rng.integers(2, size // 2)] = 1
    return maps, masks


@pytest.mark.parametrize("levels", [None, 4])
def test_average_precision_equals_sklearn_with_and_without_ties(levels):
    from sklearn.metrics import average_precision_score

    from robustfm.evals.segmentation_metrics import average_precision

    rng = np.random.default_rng(1)
    for _ in range(5):
        scores = rng.random(300) if levels is None else np.round(rng.random(300) * levels) / levels
        labels = (rng.random(300) < rng.uniform(0.1, 0.9)).astype(int)
        assert average_precision(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert np.isnan(average_precision(np.zeros(4), np.arange(4.0)))


@pytest.mark.parametrize("levels", [None, 3])
def test_pa_miou_map_equal_sklearn_references(levels):
    from sklearn.metrics import accuracy_score, average_precision_score, jaccard_score

    from robustfm.evals.segmentation_metrics import one_hot_average_precision, segmentation_counts, segmentation_summary

    maps, masks = _random_maps_and_masks(seed=7, levels=levels)
    counts = segmentation_counts(maps, masks)
    ap = one_hot_average_precision(maps, masks)
    summary = segmentation_summary(counts.correct, counts.pixels, counts.intersection, counts.union, ap)
    # References: every pixel of the set pooled (the protocol accumulates over the set), fg = map > its own mean.
    predicted = np.concatenate([(m > m.mean()).ravel() for m in maps]).astype(int)
    truth = masks.ravel().astype(int)
    assert summary["pixel_accuracy"] == pytest.approx(accuracy_score(truth, predicted), abs=1e-12)
    iou = jaccard_score(truth, predicted, average=None, labels=[0, 1])
    assert summary["iou_background"] == pytest.approx(iou[0], abs=1e-12)
    assert summary["iou_foreground"] == pytest.approx(iou[1], abs=1e-12)
    assert summary["miou"] == pytest.approx(iou.mean(), abs=1e-12)
    reference_ap = [
        average_precision_score(np.r_[1 - t.ravel(), t.ravel()], np.r_[1 - m.ravel(), m.ravel()])
        for m, t in zip(maps, masks, strict=True)
    ]
    np.testing.assert_allclose(ap, reference_ap, atol=1e-12)
    assert summary["map"] == pytest.approx(np.mean(reference_ap), abs=1e-12)


def test_set_accumulation_is_not_the_mean_of_per_image_scores():
    from robustfm.evals.segmentation_metrics import segmentation_counts, segmentation_summary

    maps, masks = _random_maps_and_masks(seed=3, n=4)
    counts = segmentation_counts(maps, masks)
    pooled = segmentation_summary(counts.correct, counts.pixels, counts.intersection, counts.union, np.zeros(4))
    per_image = counts.intersection / counts.union
    assert pooled["miou"] == pytest.approx((counts.intersection.sum(0) / counts.union.sum(0)).mean())
    assert pooled["miou"] != pytest.approx(per_image.mean(), abs=1e-6)
    perfect = segmentation_counts(masks * 0.9 + 0.05, masks)
    assert (perfect.correct == perfect.pixels).all() and (perfect.intersection == perfect.union).all()


def _params(**changes):
    params = {
        "class_names": ["circle", "square"],
        "index_of": {0: 0, 1: 1},
        "label_space": "present",
        "templates": ["a photo of a {}."],
        "methods": ["gae", "rollout", "random"],
        "target": "prediction",
        "geometry": "stretch",
    }
    return {**params, **changes}


def _objects(n: int, size: int | tuple[int, int] = 64):
    from robustfm.data.demo_images import generated_image_and_mask

    images, masks = [], []
    for index in range(n):
        image, mask = generated_image_and_mask(index % 2, size, index)
        images.append(_png(image))
        masks.append(_png(mask))
    return images, masks


def _batch(ids, images, masks, labels=None):
    batch = {
        "id": np.asarray(ids, dtype=object),
        "image": np.asarray(images, dtype=object),
        "mask": np.asarray(masks, dtype=object),
    }
    if labels is not None:
        batch["label"] = np.asarray(labels)
    return batch


@pytest.fixture(scope="module")
def scorer():
    from robustfm.evals.model_ref import ModelRef
    from robustfm.evals.suites.relevance_alignment import RelevanceAlignmentScorer

    return RelevanceAlignmentScorer(ModelRef("timm/tiny-vit"), _params(), seed=2)


def test_every_method_scores_every_image_and_rows_do_not_depend_on_the_batch(scorer):
    images, masks = _objects(3)
    together = scorer(_batch(["a", "b", "c"], images, masks))
    assert len(together["id"]) == 3 * 3 and set(together["status"]) == {"ok"}
    assert (together["pixels"] == 64 * 64).all() and (together["union"] >= together["intersection"]).all()
    assert ((together["ap"] > 0) & (together["ap"] <= 1)).all()
    alone = scorer(_batch(["b"], images[1:2], masks[1:2]))
    mine = together["id"] == "b"
    assert list(together["method"][mine]) == list(alone["method"])
    for column in ("correct", "intersection", "union", "target"):
        np.testing.assert_array_equal(together[column][mine], alone[column], err_msg=column)
    np.testing.assert_allclose(together["ap"][mine], alone["ap"], atol=1e-9)
    # The methods' maps differ, so their segmentations do.
    assert len({int(c) for c in together["correct"][mine]}) > 1


def test_bad_masks_are_skipped_with_their_reason(scorer):
    images, masks = _objects(1)
    empty = _png(np.zeros((64, 64), dtype=np.uint8))
    full = _png(np.full((64, 64), 255, dtype=np.uint8))
    small = _png(np.full((32, 32), 255, dtype=np.uint8))
    out = scorer(
        _batch(
            ["empty", "full", "small", "junk", "missing", "good"],
            images * 6,
            [empty, full, small, b"not a png", b"", masks[0]],
        )
    )
    status = {i: s for i, s in zip(out["id"], out["status"], strict=True)}
    assert status == {"empty": "empty_mask", "full": "full_mask", "small": "mask_size", "junk": "mask_invalid",
                      "missing": "mask_missing", "good": "ok"}  # fmt: skip


def test_geometries_agree_on_square_images_and_differ_on_wide_ones():
    from robustfm.evals.suites.relevance_alignment import alignment_inputs

    images, masks = _objects(1, size=64)
    square = [alignment_inputs(images[0], masks[0], 64, g, "s") for g in ("stretch", "center_crop")]
    np.testing.assert_array_equal(square[0][1], square[1][1])
    images, masks = _objects(1, size=(96, 48))
    _, stretched, _ = alignment_inputs(images[0], masks[0], 64, "stretch", "w")
    _, cropped, _ = alignment_inputs(images[0], masks[0], 64, "center_crop", "w")
    assert stretched.shape == cropped.shape == (64, 64) and not np.array_equal(stretched, cropped)


def test_label_targets_follow_the_data_and_unlabelled_rows_are_skipped():
    from robustfm.evals.model_ref import ModelRef
    from robustfm.evals.suites.relevance_alignment import RelevanceAlignmentScorer

    labelled = RelevanceAlignmentScorer(ModelRef("timm/tiny-vit"), _params(target="label", methods=["gae"]), seed=2)
    images, masks = _objects(3)
    out = labelled(_batch(["a", "b", "c"], images, masks, labels=[1, -1, 0]))
    status = dict(zip(out["id"], out["status"], strict=True))
    assert status == {"a": "ok", "b": "unlabelled", "c": "ok"}
    assert out["target"][out["id"] == "a"].tolist() == [1] and out["target"][out["id"] == "c"].tolist() == [0]


def test_clip_models_are_explained_through_their_zero_shot_classifier():
    from robustfm.evals.model_ref import ModelRef
    from robustfm.evals.suites.relevance_alignment import RelevanceAlignmentScorer

    scorer = RelevanceAlignmentScorer(ModelRef("open_clip/tiny-vit"), _params(methods=["gae"]), seed=0)
    images, masks = _objects(2)
    out = scorer(_batch(["a", "b"], images, masks))
    assert set(out["status"]) == {"ok"} and set(out["target"]) <= {0, 1}


def test_aggregate_reports_each_method_and_the_headline_columns():
    from robustfm.evals.config import EvalConfig
    from robustfm.evals.segmentation_metrics import one_hot_average_precision, segmentation_counts
    from robustfm.evals.suites.relevance_alignment import RelevanceAlignmentSuite

    maps, masks = _random_maps_and_masks(seed=5, n=3)
    counts = segmentation_counts(maps, masks)
    ap = one_hot_average_precision(maps, masks)
    rows = {
        "id": np.asarray(["a", "b", "c"] * 2, dtype=object),
        "method": np.asarray(["gae"] * 3 + ["random"] * 3, dtype=object),
        "correct": np.r_[counts.correct, counts.pixels],  # "random" here: every pixel right
        "pixels": np.r_[counts.pixels, counts.pixels],
        "intersection": np.r_[counts.intersection, counts.union],
        "union": np.r_[counts.union, counts.union],
        "ap": np.r_[ap, np.ones(3)],
        "constant": np.asarray([0, 1, 0, 0, 0, 0]),
    }
    params = {"methods": ["gae", "random"]}
    output = RelevanceAlignmentSuite(EvalConfig()).aggregate(rows, params)
    values = output.metrics.values
    assert values["gae/map"] == pytest.approx(ap.mean()) and values["gae/constant"] == pytest.approx(1 / 3)
    assert values["random/pixel_accuracy"] == 1.0 and values["random/miou"] == 1.0
    assert output.metrics.directions()["gae/constant"] == "lower"
    assert [row["method"] for row in output.table] == ["gae", "random"]
    assert RelevanceAlignmentSuite.summary_columns(params) == {
        "PA (gae)": "gae/pixel_accuracy", "mIoU (gae)": "gae/miou", "mAP (gae)": "gae/map"}  # fmt: skip


def test_settings_problems_and_config_errors_name_the_field(tmp_path):
    from robustfm.evals.config import EvalConfig, SuiteSettings
    from robustfm.evals.suites.relevance_alignment import RelevanceAlignmentConfig, RelevanceAlignmentSuite

    assert RelevanceAlignmentSuite.settings_problems(RelevanceAlignmentConfig()) == []
    found = RelevanceAlignmentSuite.settings_problems(RelevanceAlignmentConfig(methods=("gea", "random")))
    assert len(found) == 1 and "relevance_alignment.methods: unknown 'gea'; did you mean 'gae'" in found[0]
    missing = RelevanceAlignmentSuite.settings_problems(RelevanceAlignmentConfig(class_map="nope.json"))
    assert missing == ["eval.suites.relevance_alignment.class_map: 'nope.json' does not exist"]
    for section, field in [({"methods": ()}, "methods"), ({"geometry": "crop"}, "geometry"),
                           ({"label_space": "present", "class_map": "m.json"}, "class_map")]:  # fmt: skip
        with pytest.raises(ConfigError, match=field):
            RelevanceAlignmentConfig(**section)

    # Labels are read only when they are used.
    def columns(**section):
        config = RelevanceAlignmentConfig(**section)
        return RelevanceAlignmentSuite(EvalConfig(suites=SuiteSettings.build({"relevance_alignment": config}))).columns

    assert columns() == ("mask",) and columns(target="label") == ("mask", "label", "class_name")
