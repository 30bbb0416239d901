"""CFT concept validation on generated mask trees whose occurrence and coverage are known exactly, and
``jobs/cft_concepts.py validate``: its table, its summary and its exit codes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from robustfm.data.concept_validation import (
    ConceptInputError,
    ConceptValidationConfig,
    sample_stems,
    validate_concepts,
)
from robustfm.testing.datasets import save_mask
from tests.unit.test_concept_masks import save_imagenet_s

SIZE = 8


def _columns(first: int, last: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, first : last + 1] = 255
    return mask


def make_tree(root: Path, object_format: str = "binary") -> tuple[Path, Path]:
    """Two classes of 10 images; every object is the left half (32 px) of an 8x8 image.

    bird: ``head`` (left quarter, IoU 0.5) and ``eye`` (one pixel inside the head) in every image, ``tail`` (IoU 0.5)
    in image 0 only: occurrence 0.1. fish: ``fin`` (2 px inside the object, IoU 1/16) in 9 images and an all-zero
    file in the 10th (not found there): occurrence 0.9, class coverage 9/10 * 1/16.
    """
    concepts, objects = root / "concepts", root / "objects"
    eye = np.zeros((SIZE, SIZE), np.uint8)
    eye[0, 0] = 255
    fin = np.zeros((SIZE, SIZE), np.uint8)
    fin[0:2, 0] = 255
    for cls in ("bird", "fish"):
        for i in range(10):
            if object_format == "imagenet_s":
                save_imagenet_s(np.where(_columns(0, 3) > 0, 417, 0), objects / cls / f"img_{i}.png")
            else:
                save_mask(_columns(0, 3), objects / cls / f"img_{i}.png")
    for i in range(10):
        save_mask(_columns(0, 1), concepts / "bird" / f"img_{i}__head.png")
        save_mask(eye, concepts / "bird" / f"img_{i}__eye.png")
        save_mask(fin if i else np.zeros_like(fin), concepts / "fish" / f"img_{i}__fin.png")
    save_mask(_columns(2, 3), concepts / "bird" / "img_0__tail.png")
    return concepts, objects


def _rows(result) -> dict[tuple[str, str], object]:
    return {(r.class_name, r.concept): r for r in result.rows}


def test_occurrence_first_then_coverage_of_the_class_union(tmp_path):
    concepts, objects = make_tree(tmp_path)
    result = validate_concepts(ConceptValidationConfig(str(concepts), str(objects), progress=False))
    rows = _rows(result)
    assert [(c, k, rows[c, k].reason) for c, k in sorted(rows)] == [
        ("bird", "eye", "kept"),  # its own IoU is 1/32, but the class's union covers 0.5
        ("bird", "head", "kept"),
        ("bird", "tail", "low_occurrence"),
        ("fish", "fin", "low_coverage"),
    ]
    head, tail, fin = rows["bird", "head"], rows["bird", "tail"], rows["fish", "fin"]
    assert (head.images, head.present, head.occurrence, head.coverage, head.concept_iou) == (10, 10, 1.0, 0.5, 0.5)
    assert rows["bird", "eye"].concept_iou == pytest.approx(1 / 32) and rows["bird", "eye"].coverage == 0.5
    assert (tail.present, tail.occurrence, tail.coverage, tail.concept_iou) == (1, 0.1, None, 0.5)
    assert (fin.present, fin.occurrence) == (9, 0.9) and fin.coverage == pytest.approx(0.9 / 16)
    assert fin.concept_iou == pytest.approx(1 / 16)
    assert result.kept() == {"bird": ["eye", "head"], "fish": []}
    assert result.classes["fish"]["coverage"] == pytest.approx(0.9 / 16)
    assert "kept 2; dropped 1 by occurrence < 0.15, 1 by coverage < 0.2" in result.summary()
    assert "fewer than P images" in result.summary()  # 10 < 30: all used, and said so

    per_concept = _rows(
        validate_concepts(
            ConceptValidationConfig(str(concepts), str(objects), coverage_scope="concept", progress=False)
        )
    )
    assert per_concept["bird", "eye"].reason == "low_coverage" and per_concept["bird", "head"].reason == "kept"
    relaxed = _rows(
        validate_concepts(
            ConceptValidationConfig(str(concepts), str(objects), min_occurrence=0.1, min_coverage=0.05, progress=False)
        )
    )
    assert relaxed["bird", "tail"].kept and relaxed["fish", "fin"].kept  # thresholds are inclusive
    strict = _rows(
        validate_concepts(ConceptValidationConfig(str(concepts), str(objects), min_occurrence=0.95, progress=False))
    )
    assert strict["fish", "fin"].reason == "low_occurrence" and strict["bird", "head"].kept


def test_p_images_are_a_seeded_sample_per_class_and_occurrence_is_counted_on_it(tmp_path):
    concepts, objects = tmp_path / "concepts", tmp_path / "objects"
    for cls in ("cat", "dog"):
        for i in range(40):
            save_mask(_columns(0, 3), objects / cls / f"{i:02d}.png")
            if i % 2 == 0:  # "ear" is in the even images only
                save_mask(_columns(0, 3), concepts / cls / f"{i:02d}__ear.png")
    result = validate_concepts(ConceptValidationConfig(str(concepts), str(objects), progress=False))
    sampled = result.classes["cat"]["sampled"]
    assert len(sampled) == 30 and len(set(sampled)) == 30 and result.classes["cat"]["population"] == 40
    (ear,) = [r for r in result.rows if r.class_name == "cat"]
    assert ear.present == sum(int(s) % 2 == 0 for s in sampled) and ear.occurrence == ear.present / 30
    assert sampled == sample_stems([f"{i:02d}" for i in range(40)], "cat", 30, seed=0)
    assert sampled != sample_stems([f"{i:02d}" for i in range(40)], "cat", 30, seed=1)
    assert result.classes["dog"]["sampled"] != sampled  # the class name seeds its sample too

    (tmp_path / "only_cat.json").write_text(json.dumps({"cat": ["ear", "whisker"]}))
    alone = validate_concepts(
        ConceptValidationConfig(str(concepts), str(objects), candidates=str(tmp_path / "only_cat.json"), progress=False)
    )
    assert alone.classes["cat"]["sampled"] == sampled and list(alone.classes) == ["cat"]  # independent of "dog"
    whisker = _rows(alone)["cat", "whisker"]  # listed, never found: a row all the same
    assert (whisker.present, whisker.reason, whisker.concept_iou) == (0, "low_occurrence", None)
    assert any("not in the candidates file" in note for note in alone.notes)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda c, o: c.rename(c.parent / "gone"), r"concepts folder .*concepts does not exist"),
        (
            lambda c, o: (o / "fish").rename(o.parent / "fish_moved"),
            r"class 'fish' has no object masks: .*objects/fish",
        ),
        (
            lambda c, o: save_mask(np.zeros((4, 4), np.uint8), c / "bird" / "img_3__head.png"),
            r"concept mask .*bird/img_3__head.png is 4x4, its object mask .*objects/bird/img_3.png is 8x8",
        ),
        (lambda c, o: (c / "bird" / "img_2__eye.png").write_bytes(b"junk"), r"bird/img_2__eye.png is not in any"),
        (
            lambda c, o: [p.rename(p.with_name("x" + p.name)) for p in sorted((c / "fish").iterdir())],
            r"class 'fish': none of its concept masks has an object mask \(e.g. .*ximg_0__fin.png has no .*ximg_0.png",
        ),
    ],
)
def test_bad_input_fails_naming_the_path(tmp_path, breakage, message):
    concepts, objects = make_tree(tmp_path)
    breakage(concepts, objects)
    with pytest.raises(ConceptInputError, match=message):
        validate_concepts(ConceptValidationConfig(str(concepts), str(objects), progress=False))


def test_a_concept_file_outside_the_candidates_fails_naming_it(tmp_path):
    concepts, objects = make_tree(tmp_path)
    (tmp_path / "c.json").write_text(json.dumps({"bird": ["head", "eye"], "fish": ["fin"]}))
    cfg = ConceptValidationConfig(str(concepts), str(objects), candidates=str(tmp_path / "c.json"), progress=False)
    with pytest.raises(ConceptInputError, match=r"img_0__tail.png: concept 'tail' is not among class 'bird'"):
        validate_concepts(cfg)
    (tmp_path / "c.json").write_text(json.dumps({"bird": ["long__beak"]}))
    with pytest.raises(ConceptInputError, match="long__beak"):
        validate_concepts(cfg)


def _job():
    from jobs.cft_concepts import main

    return main


def test_the_job_writes_the_table_and_exits_2_on_bad_input(tmp_path, capsys):
    concepts, objects = make_tree(tmp_path, object_format="imagenet_s")
    out = tmp_path / "out"
    argv = ["validate", "--concepts", str(concepts), "--objects", str(objects), "--output", str(out)]
    assert _job()([*argv, "object_format=imagenet_s", "progress=false"]) == 0
    printed = capsys.readouterr().out
    assert (
        "4 candidate concepts in 2 classes" in printed and "kept 2" in printed and str(out / "concepts.csv") in printed
    )
    with (out / "concepts.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [(r["class"], r["concept"], r["kept"], r["reason"]) for r in table] == [
        ("bird", "eye", "True", "kept"),
        ("bird", "head", "True", "kept"),
        ("bird", "tail", "False", "low_occurrence"),
        ("fish", "fin", "False", "low_coverage"),
    ]
    assert table[1]["occurrence"] == "1.0" and table[1]["coverage"] == "0.5" and table[2]["coverage"] == ""
    saved = json.loads((out / "concepts.json").read_text())
    assert saved["kept"] == {"bird": ["eye", "head"], "fish": []}
    assert saved["settings"]["images_per_class"] == 30 and len(saved["classes"]["bird"]["sampled"]) == 10

    # ImageNet-S objects read as binary: the format is explicit, and a wrong one fails naming the file
    assert _job()([*argv, "progress=false"]) == 2
    assert "objects/bird/img_0.png: mode RGB is not a single-channel mask" in capsys.readouterr().err
    assert _job()(["validate", "--concepts", str(tmp_path / "none"), "--objects", str(objects)]) == 2
    assert f"concepts folder {tmp_path / 'none'} does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad_value:
        _job()([*argv, "min_occurrence=1.5"])
    assert bad_value.value.code == 2 and "min_occurrence" in capsys.readouterr().err
