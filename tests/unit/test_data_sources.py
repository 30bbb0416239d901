"""Sources list the three layouts correctly, and a wrong root or layout fails at once saying what was expected."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from robustfm.config import ConfigError, load_config
from robustfm.data.config import PrepareConfig
from robustfm.data.shards import Location
from robustfm.data.sources import SOURCES, LayoutError, list_coco, list_image_folder, list_imagenet
from robustfm.testing.datasets import make_coco_tree, make_image_folder, make_imagenet_tree


def _counts(listing, tree):
    """Per split and class: listed items minus the files the tree says must be skipped."""
    out = {}
    for split, items in listing.splits.items():
        out[split] = dict(Counter(i.class_name for i in items if i.path not in tree.skipped))
    return out


def test_image_folder_with_splits_lists_every_file_with_sorted_labels(tmp_path):
    tree = make_image_folder(tmp_path, n_classes=3, per_class=2, bad_files=True, splits=("train", "val"))
    listing = list_image_folder(Location(str(tmp_path)))
    assert listing.classes == tree.classes
    assert _counts(listing, tree) == tree.counts
    assert all(listing.classes[i.label] == i.class_name for items in listing.splits.values() for i in items)
    listed = {i.path for items in listing.splits.values() for i in items}
    assert set(tree.skipped) <= listed  # bad files are listed, so the converter can report them
    assert not any(".DS_Store" in p for p in listed)


def test_image_folder_without_splits_is_one_train_split_and_stray_files_are_reported(tmp_path):
    make_image_folder(tmp_path, n_classes=2, per_class=3)
    (tmp_path / "README.txt").write_text("not a class")
    listing = list_image_folder(Location(str(tmp_path)))
    assert list(listing.splits) == ["train"] and len(listing.splits["train"]) == 6
    assert [s["reason"] for s in listing.skipped] == ["not_in_class_folder"]


def test_coco_label_is_the_largest_object_and_captions_are_attached(tmp_path):
    tree = make_coco_tree(tmp_path, n_images=9, n_val=3)
    listing = list_coco(Location(str(tmp_path)))
    assert listing.classes == tree.classes
    assert _counts(listing, tree) == tree.counts
    for item in listing.splits["train"]:
        assert list(item.captions) == tree.captions[item.path]
    # Category ids are not contiguous: labels follow sorted ids.
    assert [int(c) for c in listing.class_ids] == sorted(int(c) for c in listing.class_ids)


def test_coco_image_without_annotations_or_file(tmp_path):
    make_coco_tree(tmp_path, n_images=3, n_val=1, with_photos=False)
    path = tmp_path / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    first = data["images"][0]["id"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != first]
    data["images"].append({"id": 999, "file_name": "000000000999.jpg", "width": 8, "height": 8})
    path.write_text(json.dumps(data))
    listing = list_coco(Location(str(tmp_path)), splits=("train",))
    unlabelled = [i for i in listing.splits["train"] if i.label == -1]
    assert len(unlabelled) == 1 and unlabelled[0].class_name == "" and unlabelled[0].captions
    assert [(s["path"], s["reason"]) for s in listing.skipped] == [("train2017/000000000999.jpg", "missing_file")]


@pytest.mark.parametrize("val_layout", ["folders", "loc_csv"])
def test_imagenet_validation_layouts_give_the_same_labels(tmp_path, val_layout):
    tree = make_imagenet_tree(tmp_path, n_classes=3, per_class=2, val_per_class=2, val_layout=val_layout)
    listing = list_imagenet(Location(str(tmp_path)))
    assert listing.classes == tree.classes  # names from LOC_synset_mapping.txt, label order = sorted wnids
    assert list(listing.class_ids) == sorted(listing.class_ids)
    assert _counts(listing, tree) == tree.counts


def test_imagenet_flat_val_without_labels_names_the_expected_files(tmp_path):
    make_imagenet_tree(tmp_path, val_layout="loc_csv")
    (tmp_path / "LOC_val_solution.csv").unlink()
    with pytest.raises(LayoutError, match="LOC_val_solution.csv"):
        list_imagenet(Location(str(tmp_path)))
    assert list(list_imagenet(Location(str(tmp_path)), splits=("train",)).splits) == ["train"]


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("coco", "instances_train2017.json"), ("imagenet", "train/<wnid>"), ("image_folder", "<class>/<image>")],
)
def test_wrong_root_or_layout_fails_naming_what_was_expected(tmp_path, kind, expected):
    with pytest.raises(LayoutError, match="does not exist") as missing:
        SOURCES.get(kind)(Location(str(tmp_path / "nowhere")))
    assert expected in str(missing.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayoutError) as empty:
        SOURCES.get(kind)(Location(str(tmp_path / "empty")))
    assert expected in str(empty.value)


def test_coco_tree_is_not_an_imagenet_tree(tmp_path):
    make_coco_tree(tmp_path, n_images=2, n_val=1, with_photos=False)
    with pytest.raises(LayoutError, match="imagenet"):
        list_imagenet(Location(str(tmp_path)))


def test_requested_split_that_is_missing_is_an_error(tmp_path):
    make_image_folder(tmp_path, n_classes=2, per_class=1, splits=("train",))
    with pytest.raises(LayoutError, match="val"):
        list_image_folder(Location(str(tmp_path)), splits=("val",))


def test_prepare_config_names_bad_fields():
    with pytest.raises(ConfigError) as typo:
        load_config(PrepareConfig, overrides=["source.kind=imagenett", "source.root=/data"])
    assert typo.value.field == "source.kind" and "imagenet" in str(typo.value)
    with pytest.raises(ConfigError) as size:
        load_config(PrepareConfig, overrides=["source.root=/data", "shard_size=0"])
    assert size.value.field == "shard_size"
    with pytest.raises(ConfigError) as secret:
        load_config(PrepareConfig, overrides=["source.root=/data", "s3_endpoint_url=http://key:secret@host:9000"])
    assert secret.value.field == "s3_endpoint_url" and "secret" not in str(secret.value)


def test_prepare_job_fails_at_once_on_a_wrong_layout(tmp_path, capsys, monkeypatch):
    import robustfm.runtime
    from jobs.prepare_data import main

    started = []
    monkeypatch.setattr(robustfm.runtime, "init_ray", lambda *args, **kwargs: started.append(args))
    make_image_folder(tmp_path, n_classes=2, per_class=1)
    assert main([f"source.root={tmp_path}", "source.kind=coco", f"output={tmp_path / 'out'}"]) == 2
    assert "instances_train2017.json" in capsys.readouterr().err
    assert not started  # failed before Ray was started or joined
