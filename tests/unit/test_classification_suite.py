"""The ``classification`` suite without Ray: ImageNet-1k label mapping by wnid folders, class-index folders and class
map files, the ImageNet-A/-R logit subsets, ObjectNet's primary/any match, the train/held-out split, and the settings
checks that run before Ray.

An oracle classifier reads each image's ImageNet class from its colour (a constant image with R = index % 256 and
G = index // 256) and returns one-hot logits: whatever it gets wrong is the suite's mapping, not the model.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from robustfm.config import ConfigError

SIZE = 32


class OneHotOracle(nn.Module):
    """One-hot logits over ImageNet-1k for the class coded in the image's colour; ``distractor`` adds a higher
    logit for one fixed class (outside ImageNet-A's subset) to every image."""

    image_size = SIZE
    num_classes = 1000

    def __init__(self, distractor: int | None = None) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.distractor = distractor

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        codes = (pixels.mean(dim=(2, 3)) * 255).round().long()
        index = codes[:, 0] + 256 * codes[:, 1]
        logits = torch.zeros(len(pixels), self.num_classes) + self.anchor
        logits[torch.arange(len(pixels)), index] = 1.0
        if self.distractor is not None:
            logits[:, self.distractor] = 2.0
        return logits


@dataclass(frozen=True)
class OracleRef:
    """What a scorer needs of a ``ModelRef``: ``load()``."""

    distractor: int | None = None

    def load(self) -> nn.Module:
        return OneHotOracle(self.distractor)


class FakeDataset:
    """The two calls ``scorer_params`` makes of a ``ray.data.Dataset``."""

    def __init__(self, table: pd.DataFrame) -> None:
        self.table = table

    def select_columns(self, columns: list[str]) -> FakeDataset:
        return FakeDataset(self.table[columns])

    def to_pandas(self) -> pd.DataFrame:
        return self.table


def _png(index: int) -> bytes:
    from PIL import Image

    pixels = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    pixels[..., 0], pixels[..., 1] = index % 256, index // 256
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _folder_tree(folders: list[str], imagenet_index: dict[str, int]):
    """An ``image_folder``-style split: one image per folder, labelled by the folder's position in sorted order (as
    the converter labels them), its pixels coding the ImageNet class the folder means."""
    names = sorted(folders)
    table = pd.DataFrame({"label": range(len(names)), "class_name": names})
    batch = {
        "id": np.asarray([f"{name}/0.png" for name in names], dtype=object),
        "image": np.asarray([_png(imagenet_index[name]) for name in names], dtype=object),
        "label": np.asarray(range(len(names))),
    }
    return FakeDataset(table), batch


def _suite(**section):
    from robustfm.evals.config import EvalConfig, SuiteSettings
    from robustfm.evals.suites.classification import ClassificationConfig, ClassificationSuite

    config = ClassificationConfig(templates=("a photo of a {}.",), **section)
    return ClassificationSuite(EvalConfig(suites=SuiteSettings.build({"classification": config})))


def _evaluate(suite, dataset, batch, model_ref=None):
    """Score one batch as the actor pool would, then aggregate the ok rows."""
    from robustfm.evals.suites.classification import ClassificationScorer

    params = suite.scorer_params(dataset)
    out = ClassificationScorer(model_ref or OracleRef(), params, seed=0)(batch)
    ok = out["status"] == "ok"
    return out, suite.aggregate({k: v[ok] for k, v in out.items()}, params), params


def _imagenet_a_wnids(count: int) -> list[str]:
    from robustfm.evals.label_spaces import imagenet_classes, logit_subset

    wnids = imagenet_classes().wnids
    subset = logit_subset("imagenet_a")
    return [wnids[i] for i in subset[:: len(subset) // count][:count]]


def test_timm_subset_files_are_the_synsets_they_name():
    from importlib import resources

    from robustfm.evals.label_spaces import imagenet_classes, logit_subset

    for name in ("imagenet_a", "imagenet_r"):
        indices = logit_subset(name)
        synsets = (resources.files("timm.data") / "_info" / f"{name}_synsets.txt").read_text().split()
        assert len(indices) == 200 and sorted(imagenet_classes().wnids[i] for i in indices) == sorted(synsets)
    assert logit_subset("all") is None


@pytest.mark.parametrize("subset", ["all", "imagenet_a"])
def test_oracle_on_an_imagenet_a_tree_of_wnid_folders_scores_top1_one(subset):
    from robustfm.evals.label_spaces import imagenet_classes

    folders = _imagenet_a_wnids(8)
    dataset, batch = _folder_tree(folders, {w: imagenet_classes().by_wnid[w] for w in folders})
    out, output, _ = _evaluate(_suite(logit_subset=subset), dataset, batch)
    assert set(out["status"]) == {"ok"} and len(out["id"]) == 8
    # The labels are the folders' sorted positions (0..7), the targets their ImageNet indices: the map did the work.
    assert (out["target"] != out["label"]).all()
    assert output.metrics.values["top1"] == 1.0 and output.metrics.values["top5"] == 1.0


def test_the_subset_restricts_the_argmax():
    from robustfm.evals.label_spaces import imagenet_classes, logit_subset

    folders = _imagenet_a_wnids(4)
    dataset, batch = _folder_tree(folders, {w: imagenet_classes().by_wnid[w] for w in folders})
    assert 0 not in logit_subset("imagenet_a")  # tench: the distractor every image rates highest
    _, full, _ = _evaluate(_suite(logit_subset="all"), dataset, batch, OracleRef(distractor=0))
    assert full.metrics.values["top1"] == 0.0 and full.metrics.values["top5"] == 1.0
    out, restricted, _ = _evaluate(_suite(logit_subset="imagenet_a"), dataset, batch, OracleRef(distractor=0))
    assert restricted.metrics.values["top1"] == 1.0
    assert np.isin(out["top5"], logit_subset("imagenet_a")).all()


def test_a_class_outside_the_subset_is_skipped_and_counted():
    dataset, batch = _folder_tree(["n01440764", "n01498041"], {"n01440764": 0, "n01498041": 6})
    out, output, _ = _evaluate(_suite(logit_subset="imagenet_a"), dataset, batch)
    status = dict(zip(out["id"], out["status"], strict=True))
    assert status == {"n01440764/0.png": "outside_logit_subset", "n01498041/0.png": "ok"}
    assert output.metrics.values["top1"] == 1.0


def test_class_index_folders_map_to_their_index_not_their_sorted_position():
    folders = ["0", "1", "10", "100", "2", "999"]  # sorted as strings: labels 0..5 are not the indices
    dataset, batch = _folder_tree(folders, {f: int(f) for f in folders})
    out, output, params = _evaluate(_suite(), dataset, batch)
    assert {params["data_classes"][int(y)]: int(t) for y, t in zip(out["label"], out["target"], strict=True)} == {
        f: int(f) for f in folders
    }
    assert output.metrics.values["top1"] == 1.0


def test_class_map_files_json_and_csv(tmp_path):
    from robustfm.evals.label_spaces import read_class_map

    mapping = {
        "Alarm clock": "analog clock; digital clock",  # ObjectNet's own ';'-separated names
        "Banana": 954,
        "Bottle": ["n04557648", "beer bottle", "440"],
        "Tench": "n01440764",
    }
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    found = read_class_map(str(tmp_path / "map.json"))
    assert found == {"Alarm clock": [409, 530], "Banana": [954], "Bottle": [898, 440], "Tench": [0]}
    (tmp_path / "map.csv").write_text("class,imagenet\nlocation_a,1;2\nlocation_a,n01440764\nrotation_b,goldfish\n")
    assert read_class_map(str(tmp_path / "map.csv")) == {"location_a": [1, 2, 0], "rotation_b": [1]}


def test_match_primary_and_any_differ_on_a_multi_mapped_class(tmp_path):
    (tmp_path / "map.json").write_text(json.dumps({"bottle": [898, 440], "banana": [954]}))
    # The bottle image shows a beer bottle (440): right under "any", wrong under "primary" (water bottle, 898).
    dataset, batch = _folder_tree(["banana", "bottle"], {"bottle": 440, "banana": 954})
    section = {"class_map": str(tmp_path / "map.json")}
    out, primary, _ = _evaluate(_suite(match="primary", **section), dataset, batch)
    _, any_match, _ = _evaluate(_suite(match="any", **section), dataset, batch)
    assert primary.metrics.values["top1"] == 0.5 and any_match.metrics.values["top1"] == 1.0
    assert primary.metrics.values["top5"] == 0.5 and any_match.metrics.values["top5"] == 1.0
    bottle = out["id"] == "bottle/0.png"
    assert out["targets"][bottle].tolist() == [[898, 440]] and out["targets"][~bottle].tolist() == [[954, -1]]


def test_unmapped_classes_fail_by_name_or_are_skipped_and_counted(tmp_path):
    (tmp_path / "map.json").write_text(json.dumps({"bottle": [898], "banana": [954]}))
    dataset, batch = _folder_tree(["banana", "bottle", "bottles_cap"], {"bottle": 898, "banana": 954, "bottles_cap": 1})
    section = {"class_map": str(tmp_path / "map.json")}
    with pytest.raises(ValueError, match="'bottles_cap' .*not in the class map; did you mean 'bottle'"):
        _suite(**section).scorer_params(dataset)
    out, output, params = _evaluate(_suite(unmapped="skip", **section), dataset, batch)
    assert dict(zip(out["id"], out["status"], strict=True))["bottles_cap/0.png"] == "unmapped"
    assert params["unmapped_classes"] == ["bottles_cap"] and output.metrics.values["top1"] == 1.0


def test_metrics_split_by_train_and_held_out_classes(tmp_path):
    from robustfm.evals.label_spaces import imagenet_classes

    folders = _imagenet_a_wnids(4)
    index = {w: imagenet_classes().by_wnid[w] for w in folders}
    dataset, batch = _folder_tree(folders, index)
    # The first two images show their class, the other two a class they are not: train 1.0, held-out 0.0.
    wrong = {w: (index[w] + 1) for w in folders[2:]}
    batch["image"] = np.asarray([_png(wrong.get(w, index[w])) for w in sorted(folders)], dtype=object)
    listing = tmp_path / "train_classes.txt"
    listing.write_text("# wnids the model was fine-tuned on\n" + "\n".join(sorted(folders)[:2]) + "\n")
    _, output, params = _evaluate(_suite(train_classes=str(listing)), dataset, batch)
    values = output.metrics.values
    assert values["top1"] == 0.5 and values["train/top1"] == 1.0 and values["held_out/top1"] == 0.0
    assert [row["n_images"] for row in output.table[:3]] == [4, 2, 2]
    from robustfm.evals.suites.classification import ClassificationSuite

    assert ClassificationSuite.summary_columns(params)["held-out top-1"] == "held_out/top1"
    record = _suite(train_classes=str(listing)).protocol_params(params)["resolved"]
    assert record["train_classes"] == 2 and record["classes"] == 1000 and "class_names" not in record


def test_settings_problems_name_the_field_the_file_and_the_value(tmp_path):
    from robustfm.evals.suites.classification import ClassificationConfig, ClassificationSuite

    def problems(**section):
        return " | ".join(ClassificationSuite.settings_problems(ClassificationConfig(**section)))

    assert problems() == ""
    assert "classification.class_map: 'nope.json' does not exist" in problems(class_map="nope.json")
    (tmp_path / "typo.txt").write_text("n01440764\nn01440765\n")
    found = problems(train_classes=str(tmp_path / "typo.txt"))
    assert "train_classes" in found and "'n01440765'; did you mean 'n01440764'" in found
    (tmp_path / "bad.json").write_text("{not json")
    assert "cannot be read" in problems(class_map=str(tmp_path / "bad.json"))
    (tmp_path / "wrong.json").write_text(json.dumps({"chair": ["n03376596", 1000], "crane": "crane"}))
    found = problems(class_map=str(tmp_path / "wrong.json"))
    assert "class 'chair': class index 1000 is outside" in found and "several ImageNet classes" in found
    (tmp_path / "map.yaml").write_text("a: 1\n")
    assert "must end in .json or .csv" in problems(class_map=str(tmp_path / "map.yaml"))


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"label_space": "present", "logit_subset": "imagenet_r"}, "logit_subset"),
        ({"label_space": "present", "class_map": "m.json"}, "class_map"),
        ({"label_space": "present", "train_classes": "t.txt"}, "train_classes"),
        ({"match": "all"}, "match"),
        ({"templates": ("no placeholder",)}, "templates"),
    ],
)
def test_bad_settings_fail_at_config_time_naming_the_field(section, field):
    from robustfm.evals.suites.classification import ClassificationConfig

    with pytest.raises(ConfigError, match=field):
        ClassificationConfig(**section)


def test_label_space_errors_keep_naming_the_class():
    from robustfm.evals.label_spaces import resolve_label_space

    with pytest.raises(ValueError, match="'n01440765' is not an ImageNet-1k wnid; did you mean 'n01440764'"):
        resolve_label_space("imagenet1k", {0: "n01440765"})
    with pytest.raises(ValueError, match="class index 1000 is outside"):
        resolve_label_space("imagenet1k", {0: "1000"})
    space = resolve_label_space("imagenet1k", {0: "7", 1: "nothing_like_it"}, unmapped="skip")
    assert space.index_of == {0: 7} and space.unmapped == ["nothing_like_it"]


def test_a_classifier_needs_a_1000_way_head_for_imagenet1k_and_scores_its_head_otherwise():
    from robustfm.evals.model_ref import ModelRef
    from robustfm.evals.suites.classification import ClassificationScorer

    dataset, batch = _folder_tree(["n01440764"], {"n01440764": 0})
    params = _suite().scorer_params(dataset)
    with pytest.raises(ValueError, match="imagenet1k needs a classifier with 1000 outputs.*has 10"):
        ClassificationScorer(ModelRef("timm/tiny-vit"), params, seed=0)
    present = _suite(label_space="present")
    dataset, batch = _folder_tree(["cat", "dog", "eel"], {"cat": 0, "dog": 1, "eel": 2})
    params = present.scorer_params(dataset)
    out = ClassificationScorer(ModelRef("timm/tiny-vit"), params, seed=0)(batch)
    assert set(out["status"]) == {"ok"} and out["target"].tolist() == [0, 1, 2]
    assert ((out["top5"] >= 0) & (out["top5"] < 10)).all()  # any of the head's 10 classes may be predicted


def test_clip_is_scored_zero_shot_over_imagenet1k_within_the_subset():
    from robustfm.evals.label_spaces import logit_subset
    from robustfm.evals.model_ref import ModelRef
    from robustfm.evals.suites.classification import ClassificationScorer

    folders = _imagenet_a_wnids(3)
    dataset, batch = _folder_tree(folders, dict.fromkeys(folders, 0))
    params = _suite(logit_subset="imagenet_a").scorer_params(dataset)
    torch.manual_seed(0)
    out = ClassificationScorer(ModelRef("open_clip/tiny-vit"), params, seed=0)(batch)
    assert set(out["status"]) == {"ok"} and np.isin(out["top5"], logit_subset("imagenet_a")).all()
    assert len({tuple(row) for row in out["top5"]}) >= 1 and (out["top5"] >= 0).all()


def test_rows_do_not_depend_on_the_batch_they_came_in():
    from robustfm.evals.model_ref import ModelRef
    from robustfm.evals.suites.classification import ClassificationScorer

    present = _suite(label_space="present")
    dataset, batch = _folder_tree(["a", "b", "c", "d"], {"a": 3, "b": 5, "c": 7, "d": 9})
    scorer = ClassificationScorer(ModelRef("timm/tiny-vit"), present.scorer_params(dataset), seed=0)
    together = scorer(batch)
    alone = scorer({k: v[2:3] for k, v in batch.items()})
    np.testing.assert_array_equal(together["top5"][2:3], alone["top5"])


def test_data_classes_that_map_nowhere_fail_before_ray(monkeypatch):
    import robustfm.data.shards as shards
    from robustfm.evals.config import EvalDataConfig
    from robustfm.evals.suites.classification import ClassificationConfig, ClassificationSuite

    class Split:
        def read_rows(self, columns):
            assert columns == ["label", "class_name"]  # the class columns only, never the images
            return {"label": [0, 1, 1, -1], "class_name": ["n01440764", "n01443538", "n01443538", "unlabelled"]}

    monkeypatch.setattr(shards, "list_split", lambda location, split: Split())
    data = EvalDataConfig(shards="/data/imagenet-a/shards", split="val")
    found = ClassificationSuite.settings_problems(ClassificationConfig(data=data))
    assert len(found) == 1 and "data '/data/imagenet-a/shards' split 'val'" in found[0]
    assert "'n01443538' is not an ImageNet-1k wnid; did you mean 'n01443537'" in found[0]
    assert ClassificationSuite.settings_problems(ClassificationConfig(data=data, unmapped="skip")) == []


def test_class_text_embeddings_batched_across_classes_equal_one_class_at_a_time():
    from robustfm.evals.class_logits import class_text_embeddings
    from robustfm.models import create_model

    model = create_model("open_clip/tiny-vit").eval()
    names, templates = [f"class {i}" for i in range(7)], ["a photo of a {}.", "a {}", "art of the {}"]
    with torch.no_grad():
        batched = class_text_embeddings(model, names, templates, batch_size=6)  # 2 classes per batch, a short tail
        single = [model.encode_text([t.format(n) for t in templates], normalize=True).float().mean(0) for n in names]
    torch.testing.assert_close(batched, torch.stack([e / e.norm() for e in single]), atol=1e-5, rtol=1e-5)
