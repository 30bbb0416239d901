"""Shard encoding, atomic writes, manifests, and the seeded train / eval transforms (no Ray)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from robustfm.data import reading
from robustfm.data.shards import (
    BASE_COLUMNS,
    BASE_SPECS,
    SCHEMA_VERSION,
    ColumnKind,
    ColumnSpec,
    Location,
    ManifestError,
    MissingColumnError,
    check_extra_columns,
    encode_shard,
    load_manifest,
    manifest_columns,
    require_columns,
    shard_columns,
    shard_schema,
    write_bytes_atomic,
    write_json_atomic,
)
from robustfm.testing.datasets import generated_image


def _jpeg(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(generated_image(seed % 3, size, seed)).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def _row(i: int) -> dict:
    return {
        "id": f"train/c/{i}.jpg",
        "image": _jpeg(i),
        "label": i % 3,
        "class_name": "c",
        "captions": [f"cap {i}"] * (i % 2),
        "source_path": f"train/c/{i}.jpg",
        "width": 64,
        "height": 48,
    }


def test_shard_round_trips_with_schema_version_and_row_positions():
    table = pq.read_table(io.BytesIO(encode_shard([_row(i) for i in range(5)])))
    assert table.schema.equals(shard_schema(), check_metadata=False)
    assert table.schema.metadata[b"robustfm.schema_version"] == str(SCHEMA_VERSION).encode()
    assert table.column("row").to_pylist() == [0, 1, 2, 3, 4]
    assert table.column("captions").to_pylist()[1] == ["cap 1"]
    assert table.column("image").to_pylist()[3] == _row(3)["image"]


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    location = Location(str(tmp_path))
    target = location.join("train", "shard-00000.parquet")
    write_bytes_atomic(location, target, b"first")
    write_bytes_atomic(location, target, b"second")
    assert open(target, "rb").read() == b"second"
    assert os.listdir(tmp_path / "train") == ["shard-00000.parquet"]


def test_interrupted_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    location = Location(str(tmp_path))
    target = location.join("manifest.json")
    write_json_atomic(location, target, {"v": 1})

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(location, target, {"v": 2})
    assert '"v": 1' in open(target).read()
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_missing_manifest_names_the_directory(tmp_path):
    with pytest.raises(ManifestError, match="manifest.json does not exist"):
        load_manifest(Location(str(tmp_path)))
    write_json_atomic(Location(str(tmp_path)), str(tmp_path / "manifest.json"), {"schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(ManifestError, match="schema_version"):
        load_manifest(Location(str(tmp_path)))


def test_train_transform_is_a_function_of_id_epoch_and_seed():
    data = _jpeg(7)
    args = dict(image_size=32, train=True, crop_scale=(0.3, 1.0))
    first = reading.transform_image(data, "a", seed=0, epoch=0, **args)
    assert first.shape == (3, 32, 32) and first.dtype == np.float32
    assert 0.0 <= first.min() and first.max() <= 1.0
    np.testing.assert_array_equal(first, reading.transform_image(data, "a", seed=0, epoch=0, **args))
    for other in ({"seed": 1, "epoch": 0}, {"seed": 0, "epoch": 1}):
        assert not np.array_equal(first, reading.transform_image(data, "a", **other, **args))
    assert not np.array_equal(first, reading.transform_image(data, "b", seed=0, epoch=0, **args))


def test_eval_transform_is_resize_shorter_side_and_center_crop():
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, 20:60] = 255  # the centred square is white, the sides black
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    out = reading.transform_image(buffer.getvalue(), "x", 16, train=False, seed=0, epoch=0, crop_scale=(1.0, 1.0))
    assert out.shape == (3, 16, 16)
    # Only the white centre is kept (bicubic lets the black sides darken the outermost columns a little).
    assert out[:, :, 2:-2].min() > 0.99 and out.min() > 0.8
    again = reading.transform_image(buffer.getvalue(), "x", 16, train=False, seed=9, epoch=3, crop_scale=(1.0, 1.0))
    np.testing.assert_array_equal(out, again)


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.9, 1.0)])
def test_random_resized_box_stays_inside_and_respects_scale(scale):
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = reading.random_resized_box(120, 80, rng, scale)
        assert 0 <= left < right <= 120 and 0 <= top < bottom <= 80
        area = (right - left) * (bottom - top) / (120 * 80)
        assert scale[0] * 0.9 <= area <= 1.0


def test_to_torch_batch_converts_numbers_and_keeps_text():
    import torch

    batch = {
        "image": np.zeros((2, 3, 4, 4), dtype=np.float32),
        "label": np.array([1, 2]),
        "id": np.array(["a", "b"], dtype=object),
        "captions": np.array([np.array(["x", "y"]), np.array([], dtype=object)], dtype=object),
    }
    out = reading.to_torch_batch(batch)
    assert isinstance(out["image"], torch.Tensor) and out["image"].dtype == torch.float32
    assert out["label"].tolist() == [1, 2]
    assert out["id"] == ["a", "b"] and out["captions"] == [["x", "y"], []]


def test_epoch_sequence_is_a_seeded_permutation_of_every_row():
    from robustfm.data.batch_source import epoch_sequence

    shard_rows = [5, 3, 4, 5]
    windows, shards, rows = epoch_sequence(shard_rows, seed=0, epoch=0, shuffle=True, window=2)
    pairs = list(zip(shards.tolist(), rows.tolist(), strict=True))
    assert sorted(pairs) == [(s, r) for s, n in enumerate(shard_rows) for r in range(n)]
    assert list(windows) == sorted(windows)  # windows follow each other
    for w in set(windows.tolist()):  # a window holds exactly two whole shards
        members = set(shards[windows == w].tolist())
        assert len(members) <= 2 and (windows == w).sum() == sum(shard_rows[s] for s in members)
    again = epoch_sequence(shard_rows, seed=0, epoch=0, shuffle=True, window=2)
    assert all(np.array_equal(a, b) for a, b in zip(again, (windows, shards, rows), strict=True))
    for seed, epoch in ((1, 0), (0, 1)):
        other = epoch_sequence(shard_rows, seed=seed, epoch=epoch, shuffle=True, window=2)
        assert list(zip(other[1].tolist(), other[2].tolist(), strict=True)) != pairs
    _, plain_shards, plain_rows = epoch_sequence(shard_rows, seed=0, epoch=3, shuffle=False, window=1)
    assert list(zip(plain_shards.tolist(), plain_rows.tolist(), strict=True)) == sorted(pairs)


# --- schema v2: declared extra columns ------------------------------------------------------------------------------

EXTRA = {
    "mask": ColumnSpec(ColumnKind.MASK, "foreground"),
    "left": ColumnSpec(ColumnKind.IMAGE, "first distortion"),
    "pair": ColumnSpec(ColumnKind.GROUP, "rows of one pair share it"),
    "judge": ColumnSpec(ColumnKind.FLOAT, "share of people preferring left"),
}


def test_extra_columns_round_trip_with_their_declarations():
    rows = [
        {**_row(i), "mask": b"png bytes", "left": _jpeg(i + 10), "pair": f"p{i // 2}", "judge": i / 4} for i in range(4)
    ]
    table = pq.read_table(io.BytesIO(encode_shard(rows, EXTRA)))
    assert table.schema.names == [*BASE_COLUMNS, "mask", "left", "pair", "judge"]
    assert table.column("pair").to_pylist() == ["p0", "p0", "p1", "p1"]
    assert table.column("judge").to_pylist() == [0.0, 0.25, 0.5, 0.75]
    assert table.column("left").to_pylist()[2] == _jpeg(12)
    declared = json.loads(table.schema.metadata[b"robustfm.columns"])
    assert declared["mask"] == {"kind": "mask", "meaning": "foreground"} and declared["image"]["kind"] == "image"
    with pytest.raises(KeyError, match="judge"):  # every declared column must be filled
        encode_shard([{k: v for k, v in rows[0].items() if k != "judge"}], EXTRA)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"label": ColumnSpec("float")}, "clashes with a base column"),
        ({"Left": ColumnSpec("image")}, "lower_snake_case"),
        ({"left": ColumnSpec("texts")}, "kind 'texts' is not one of"),
    ],
)
def test_bad_extra_column_declarations_name_the_column(extra, message):
    with pytest.raises(ValueError, match=message):
        check_extra_columns(extra)


def _manifest_dir(tmp_path, manifest) -> str:
    write_json_atomic(Location(str(tmp_path)), str(tmp_path / "manifest.json"), manifest)
    return str(tmp_path)


def test_v1_manifests_still_read_and_declare_the_base_columns(tmp_path):
    path = _manifest_dir(tmp_path, {"schema_version": 1, "columns": list(BASE_COLUMNS), "splits": {}})
    assert load_manifest(Location(path))["schema_version"] == 1
    columns = shard_columns(path)
    assert list(columns) == list(BASE_COLUMNS) and columns["image"].kind == ColumnKind.IMAGE
    with pytest.raises(MissingColumnError, match=r"reads column\(s\) \['mask'\].*" + str(tmp_path)):
        require_columns(path, ["image", "mask"], reader="suite 'masked'")


def test_v2_manifest_columns_are_checked_against_what_a_reader_needs(tmp_path):
    declared = {name: spec.to_json() for name, spec in {**BASE_SPECS, **EXTRA}.items()}
    path = _manifest_dir(tmp_path, {"schema_version": 2, "columns": declared, "splits": {}})
    assert require_columns(path, ["image", "mask", "pair"])["judge"] == EXTRA["judge"]
    with pytest.raises(MissingColumnError, match=r"suite 'x' reads column\(s\) \['right'\]"):
        require_columns(path, ["left", "right"], reader="suite 'x'")
    broken = {**declared, "weird": {"kind": "tensor"}}
    with pytest.raises(ManifestError, match="weird"):
        manifest_columns({"schema_version": 2, "columns": broken}, "x/manifest.json")
    with pytest.raises(ManifestError, match="lacks base column"):
        manifest_columns({"schema_version": 2, "columns": {"mask": {"kind": "mask"}}})
    for version in (0, SCHEMA_VERSION + 1):
        _manifest_dir(tmp_path, {"schema_version": version})
        with pytest.raises(ManifestError, match="schema_version"):
            load_manifest(Location(path))
