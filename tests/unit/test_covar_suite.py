"""The ``covar`` suite without Ray: rows per image, counted skips, deterministic variants, the BG-Er / Fine-Er rules,
the label spaces, the protocol record and the checks that run before Ray."""

from __future__ import annotations

import io

import numpy as np
import pytest

from robustfm.config import ConfigError

VARIANTS = ["hflip", "vflip", "translate", "crop", "rotation", "scale"]


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def backgrounds(tmp_path_factory):
    from robustfm.data.demo import write_background_folder

    return str(write_background_folder(tmp_path_factory.mktemp("bgs"), 64))


def _params(backgrounds, **changes):
    from robustfm.evals.covar_inputs import CovarBackgroundsConfig, load_backgrounds

    params = {
        "class_names": ["circle", "square"],
        "index_of": {0: 0, 1: 1},
        "label_space": "present",
        "templates": ["a photo of a {}."],
        "backgrounds": load_backgrounds(CovarBackgroundsConfig(folder=backgrounds)),
        "n_backgrounds": 2,
        "variants": VARIANTS,
        "canvas": "background",
        "error_analysis": True,
        "binarize": "soft",
        "cci_k": 4,
        "forward_batch_size": 64,
        "similar_pairs": None,
        "fine_er_tau": 0.8,
    }
    return {**params, **changes}


def _objects(n: int, size: int = 64):
    from robustfm.data.demo_images import generated_image_and_mask

    images, masks = [], []
    for index in range(n):
        image, mask = generated_image_and_mask(index % 2, size, index)
        images.append(_png(image))
        masks.append(_png(mask))
    return images, masks


def _batch(ids, images, masks, labels):
    return {
        "id": np.asarray(ids, dtype=object),
        "image": np.asarray(images, dtype=object),
        "mask": np.asarray(masks, dtype=object),
        "label": np.asarray(labels),
    }


@pytest.fixture(scope="module")
def scorer(backgrounds):
    from robustfm.evals.model_ref import ModelRef
    from robustfm.evals.suites.covar import CovarScorer

    return CovarScorer(ModelRef("timm/tiny-vit"), _params(backgrounds), seed=1)


def test_each_image_gives_its_original_bg_varied_and_variant_rows(scorer):
    images, masks = _objects(3)
    out = scorer(_batch(["a", "b", "c"], images, masks, [0, 1, 0]))
    assert len(out["id"]) == 3 * (1 + 2 * (1 + len(VARIANTS))) and set(out["status"]) == {"ok"}
    mine = out["id"] == "b"
    subsets = list(out["subset"][mine])
    assert subsets.count("original") == 1 and subsets.count("bg_varied") == 2
    assert all(subsets.count(v) == 2 for v in VARIANTS)
    backgrounds = set(out["background"][mine & (out["subset"] == "bg_varied")])
    assert set(out["background"][mine & (out["subset"] == "rotation")]) == backgrounds
    # Every error is explained as background- or foreground-driven; correct rows are not.
    wrong = out["top5"][:, 0] != out["target"]
    assert wrong.any() and set(out["error"][wrong]) <= {"bg", "fg"} and set(out["error"][~wrong]) <= {""}


def test_rows_repeat_whatever_batch_the_image_comes_in(scorer):
    images, masks = _objects(2)
    together = scorer(_batch(["x", "y"], images, masks, [0, 1]))
    alone = scorer(_batch(["y"], images[1:], masks[1:], [1]))
    mine = together["id"] == "y"
    assert list(together["background"][mine]) == list(alone["background"])
    np.testing.assert_array_equal(together["top5"][mine], alone["top5"])
    assert list(together["error"][mine]) == list(alone["error"])


def test_bad_masks_are_skipped_with_their_reason(scorer):
    images, masks = _objects(1)
    empty = _png(np.zeros((64, 64), dtype=np.uint8))
    full = _png(np.full((64, 64), 255, dtype=np.uint8))
    small = _png(np.full((32, 32), 255, dtype=np.uint8))
    out = scorer(
        _batch(
            ["empty", "full", "small", "junk", "good", "unlabelled"],
            images * 6,
            [empty, full, small, b"not a png", masks[0], masks[0]],
            [0, 0, 0, 0, 0, 7],
        )
    )
    status = dict(zip(out["id"], out["status"], strict=True))
    assert status["empty"] == "empty_mask" and status["full"] == "full_mask"
    assert status["small"] == "mask_size" and status["junk"] == "mask_invalid"
    assert status["good"] == "ok" and status["unlabelled"] == "unlabelled"


def test_foreground_binarizes_01_and_8bit_masks():
    from robustfm.evals.covar_inputs import foreground

    assert foreground(np.array([[0, 1]], dtype=np.uint8)).tolist() == [[0.0, 1.0]]
    assert foreground(np.array([[0, 127, 128, 255]], dtype=np.uint8)).tolist() == [[0.0, 0.0, 1.0, 1.0]]


def test_map_overlap_decides_background_driven_errors():
    import torch

    from robustfm.evals.covar_inputs import map_overlap

    fg = torch.zeros(1, 4, 4)
    fg[:, :2] = 1  # top half is the object
    on_background = torch.zeros(1, 4, 4)
    on_background[:, 3] = 1.0
    on_object = torch.zeros(1, 4, 4)
    on_object[:, 0] = 0.9
    for binarize in ("soft", "mean"):
        assert map_overlap(on_background, 1 - fg, binarize) > map_overlap(on_background, fg, binarize)
        assert map_overlap(on_object, fg, binarize) > map_overlap(on_object, 1 - fg, binarize)
    # Soft IoU: sum(min) / sum(max): the object row at 0.9 against the 2-row object.
    assert float(map_overlap(on_object, fg, "soft")) == pytest.approx(0.9 * 4 / 8)


def _rows(subsets, targets, predictions, errors, cosines):
    n = len(subsets)
    top5 = np.full((n, 5), -1)
    top5[:, 0] = predictions
    return {
        "id": np.asarray([f"s{i}" for i in range(n)], dtype=object),
        "subset": np.asarray(subsets, dtype=object),
        "background": np.asarray([""] * n, dtype=object),
        "target": np.asarray(targets),
        "top5": top5,
        "error": np.asarray(errors, dtype=object),
        "class_cosine": np.asarray(cosines, dtype=np.float32),
        "degenerate": np.zeros(n, dtype=np.int8),
    }


def test_error_mix_fine_er_from_the_pairs_table_and_the_proxy_otherwise(tmp_path):
    from robustfm.evals.config import EvalConfig
    from robustfm.evals.suites.covar import CovarSuite

    names = ["husky", "malamute", "car"]
    rows = _rows(
        ["original", "original", "bg_varied", "bg_varied", "bg_varied", "bg_varied"],
        [0, 2, 0, 0, 0, 2],
        [0, 2, 1, 2, 1, 2],
        ["", "", "fg", "fg", "bg", ""],
        [1.0, 1.0, 0.9, 0.2, 0.95, 1.0],
    )
    table = tmp_path / "pairs.csv"
    table.write_text("a,b\nmalamute,husky\n")
    base = {"variants": [], "class_names": names, "error_analysis": True, "fine_er_tau": 0.8}
    with_table = CovarSuite(EvalConfig()).aggregate(rows, {**base, "similar_pairs": str(table)}).metrics.values
    assert with_table["bg_varied/bg_er"] == pytest.approx(1 / 3)
    assert with_table["bg_varied/fine_er"] == pytest.approx(1 / 3)  # husky -> malamute, listed
    assert with_table["bg_varied/other_er"] == pytest.approx(1 / 3)  # husky -> car
    assert "bg_varied/fine_er_proxy" not in with_table
    proxy = CovarSuite(EvalConfig()).aggregate(rows, {**base, "similar_pairs": None}).metrics.values
    assert proxy["bg_varied/fine_er_proxy"] == pytest.approx(1 / 3) and "bg_varied/fine_er" not in proxy
    assert with_table["original/top1"] == 1.0 and with_table["bg_varied/top1"] == pytest.approx(1 / 4)
    # Class drop: husky 1.0 -> 0.0, car 1.0 -> 1.0.
    assert with_table["bg_varied/class_drop_mean"] == pytest.approx(0.5)
    assert with_table["bg_varied/class_drop_max"] == pytest.approx(1.0)


def test_label_spaces_map_wnids_and_lemmas_and_name_what_they_cannot():
    from robustfm.evals.label_spaces import resolve_label_space

    present = resolve_label_space("present", {3: "cat", 7: "dog"})
    assert present.class_names == ["cat", "dog"] and present.index_of == {3: 0, 7: 1}
    imagenet = resolve_label_space("imagenet1k", {0: "n01440764", 1: "Goldfish", 2: "n02012849"})
    assert len(imagenet.class_names) == 1000 and imagenet.class_names[0] == "tench"
    assert imagenet.index_of == {0: 0, 1: 1, 2: 134}  # n02012849 is the bird "crane"
    with pytest.raises(ValueError, match="'crane'.*several ImageNet classes"):
        resolve_label_space("imagenet1k", {0: "crane"})
    with pytest.raises(ValueError, match="'shape_3'.*neither an ImageNet wnid"):
        resolve_label_space("imagenet1k", {5: "shape_3"})
    with pytest.raises(ValueError, match="label_space 'coco'"):
        resolve_label_space("coco", {0: "cat"})


def test_zero_shot_over_imagenet1k_scores_against_all_classes():
    import torch

    from robustfm.evals.label_spaces import resolve_label_space
    from robustfm.evals.model_ref import ModelRef
    from robustfm.evals.suites.zero_shot import ZeroShotScorer

    space = resolve_label_space("imagenet1k", {4: "tench"})
    params = {"class_names": space.class_names, "index_of": space.index_of, "templates": ["a photo of a {}."],
              "corruptions": [], "severities": [], "perturbations": {}}  # fmt: skip
    torch.manual_seed(0)
    scorer = ZeroShotScorer(ModelRef("open_clip/tiny-vit"), params, seed=0)
    images, _ = _objects(1)
    out = scorer({"id": np.asarray(["t"], dtype=object), "image": np.asarray(images, dtype=object), "label": [4]})
    assert out["logits"].shape == (1, 1000) and out["label"].tolist() == [0]


def test_settings_are_checked_before_ray(backgrounds, tmp_path):
    from robustfm.evals.covar_inputs import CovarBackgroundsConfig
    from robustfm.evals.suites.covar import CovarConfig, CovarSuite

    assert CovarSuite.settings_problems(CovarConfig(backgrounds=CovarBackgroundsConfig(folder=backgrounds))) == []
    no_pool = CovarSuite.settings_problems(CovarConfig())
    assert any("no background pool" in p for p in no_pool)
    (tmp_path / "empty").mkdir()
    empty = CovarSuite.settings_problems(
        CovarConfig(backgrounds=CovarBackgroundsConfig(folder=str(tmp_path / "empty")))
    )
    assert any("has no images" in p for p in empty)
    wrong = CovarConfig(backgrounds=CovarBackgroundsConfig(folder=backgrounds), variants=("hflip", "viewpoint"))
    assert any("variants: unknown ['viewpoint']" in p for p in CovarSuite.settings_problems(wrong))
    missing = CovarConfig(backgrounds=CovarBackgroundsConfig(folder=backgrounds), similar_pairs="nope.csv")
    assert any("similar_pairs" in p for p in CovarSuite.settings_problems(missing))
    with pytest.raises(ConfigError, match="cci_k"):
        CovarConfig(cci_k=1)
    with pytest.raises(ConfigError, match="shards"):
        CovarBackgroundsConfig(shards="a", folder="b")


def test_protocol_hashes_the_pool_and_records_the_offline_deviations(backgrounds):
    from robustfm.evals.config import EvalConfig
    from robustfm.evals.suites.covar import CovarSuite

    params = _params(backgrounds)
    record = CovarSuite(EvalConfig()).protocol_params(params)["resolved"]
    assert record["backgrounds"]["count"] == len(params["backgrounds"])
    assert len(record["backgrounds"]["ids_sha256"]) == 64
    assert any("viewpoint" in line for line in record["offline_deviations"])
    assert record["cci_k"] == 4 and record["canvas"] == "background"


def test_k_beyond_the_patches_fails_when_the_actor_builds_the_model(backgrounds):
    from robustfm.evals.model_ref import ModelRef
    from robustfm.evals.suites.covar import CovarScorer

    with pytest.raises(ValueError, match="cci_k = 65 exceeds the model's 64 patches"):
        CovarScorer(ModelRef("timm/tiny-vit"), _params(backgrounds, cci_k=65), seed=0)
