"""prepare_data end to end on Ray: three layouts with every bad-file kind, resume after an interruption, and S3."""

from __future__ import annotations

import hashlib
import io
import os
from collections import Counter

import pyarrow.parquet as pq
import pytest
from PIL import Image

from robustfm.data.config import PrepareConfig, SourceConfig
from robustfm.data.prepare import run
from robustfm.data.shards import Location, load_manifest
from robustfm.runtime import free_loopback_port
from robustfm.testing.datasets import make_coco_tree, make_image_folder, make_imagenet_tree

pytestmark = pytest.mark.ray
BUILDERS = {"image_folder": make_image_folder, "coco": make_coco_tree, "imagenet": make_imagenet_tree}


def _config(root, output, kind, shard_size=5, **kwargs) -> PrepareConfig:
    source = SourceConfig(kind=kind, root=str(root))
    return PrepareConfig(source=source, output=str(output), shard_size=shard_size, progress=False, **kwargs)


def _shard_files(output) -> dict[str, int]:
    return {
        os.path.relpath(os.path.join(d, f), output): os.stat(os.path.join(d, f)).st_mtime_ns
        for d, _, files in os.walk(output)
        for f in files
        if f.endswith(".parquet")
    }


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_prepare_each_layout_with_every_bad_file_kind(ray_session, tmp_path, kind):
    tree = BUILDERS[kind](tmp_path / "src", size=32, bad_files=True, seed=1)
    summary = run(_config(tree.root, tmp_path / "out", kind))

    assert summary.counts_per_class == tree.counts
    assert summary.skipped_by_reason == dict(Counter(tree.skipped.values()))
    manifest = load_manifest(Location(str(tmp_path / "out")))
    assert {s["path"]: s["reason"] for s in manifest["skipped"]} == tree.skipped
    assert manifest["classes"] == list(tree.classes)
    assert manifest["source"] == {"kind": kind, "root": str(tree.root), "splits": sorted(tree.counts)}
    rows = []
    for split, entry in manifest["splits"].items():
        assert entry["count"] == tree.total(split)
        for shard in entry["shards"]:
            data = (tmp_path / "out" / shard["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
            table = pq.read_table(io.BytesIO(data))
            assert table.num_rows == shard["rows"]
            rows += table.to_pylist()
    assert len({r["id"] for r in rows}) == len(rows) == sum(tree.total(s) for s in tree.counts)
    by_path = {r["source_path"]: r for r in rows}
    for rel in tree.expected_rgb:  # decodable bad files are stored as correct upright RGB
        row = by_path[rel]
        image = Image.open(io.BytesIO(row["image"]))
        assert image.mode == "RGB" and image.size == (row["width"], row["height"])
        assert tree.classes[row["label"]] == row["class_name"]
    exif = by_path[tree.bad_files["exif_rotated"]]
    assert (exif["width"], exif["height"]) == (32, 16)
    if kind == "coco":
        assert all(r["captions"] == tree.captions[r["source_path"]] for r in rows if r["source_path"] in tree.captions)

    again = run(_config(tree.root, tmp_path / "out", kind))
    assert again.shards_written == 0 and again.shards_reused == summary.shards_written + summary.shards_reused
    assert again.counts_per_class == summary.counts_per_class


class _Interrupt(Exception):
    pass


@pytest.mark.timeout(240)
def test_interrupted_run_resumes_and_never_rewrites_finished_shards(ray_session, tmp_path):
    tree = make_image_folder(tmp_path / "src", n_classes=3, per_class=6, size=32, bad_files=True)
    config = _config(tree.root, tmp_path / "out", "image_folder", shard_size=3)
    finished = []

    def fail_after_two(record):
        finished.append(record["file"])
        if len(finished) == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        run(config, on_shard_done=fail_after_two)
    assert not (tmp_path / "out" / "manifest.json").exists()  # readers never see an unfinished conversion
    before = _shard_files(tmp_path / "out")
    assert sorted(before) == sorted(f for f in finished if f)
    assert not [f for _, _, files in os.walk(tmp_path / "out") for f in files if ".tmp-" in f]

    # A finished shard damaged since (checksum mismatch) is converted again; the others are left alone.
    damaged = sorted(before)[0]
    (tmp_path / "out" / damaged).write_bytes(b"not parquet")
    before = _shard_files(tmp_path / "out")
    written = []
    summary = run(config, on_shard_done=lambda record: written.append(record["file"]))

    total_shards = -(-(3 * 6 + 8) // 3)
    assert summary.shards_reused == len(before) - 1
    assert summary.shards_written == total_shards - summary.shards_reused == len(written)
    assert damaged in written and not set(written) & (set(before) - {damaged})
    after = _shard_files(tmp_path / "out")
    assert all(after[f] == before[f] for f in before if f != damaged)
    assert summary.counts_per_class == tree.counts
    assert load_manifest(Location(str(tmp_path / "out")))["splits"]["train"]["count"] == tree.total("train")


@pytest.fixture
def s3_server(monkeypatch):
    """moto's S3 on loopback, with dummy credentials set for this test only."""
    from moto.server import ThreadedMotoServer

    port = free_loopback_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }.items():
        monkeypatch.setenv(name, value)
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="robustfm-test")
    yield endpoint
    server.stop()


@pytest.mark.timeout(240)
def test_prepare_job_to_s3_then_resume_and_read_with_ray_data(ray_session, tmp_path, s3_server, capsys):
    import boto3

    from jobs.prepare_data import main
    from robustfm.data.batch_source import ShardBatchSource
    from robustfm.data.reading import open_shards

    tree = make_image_folder(tmp_path / "src", n_classes=2, per_class=4, size=32, bad_files=True)
    output = "s3://robustfm-test/datasets/folder"
    args = [f"source.root={tree.root}", f"output={output}", "shard_size=4", "progress=false"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "4 written, 0 reused" in printed and f"train: {tree.total('train')} images" in printed
    assert "empty_file 1, not_an_image 1, truncated 1" in printed
    assert "testing" not in printed  # the dummy credentials

    client = boto3.client("s3", endpoint_url=s3_server)
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="robustfm-test")["Contents"]}
    assert "datasets/folder/manifest.json" in keys
    manifest = load_manifest(Location(output))
    for shard in manifest["splits"]["train"]["shards"]:
        body = client.get_object(Bucket="robustfm-test", Key=f"datasets/folder/{shard['file']}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == shard["sha256"]
    assert {s["path"]: s["reason"] for s in manifest["skipped"]} == tree.skipped

    again = run(_config(tree.root, output, "image_folder", shard_size=4))
    assert again.shards_written == 0 and again.shards_reused == 4

    ds = open_shards(output, "train", columns=["id", "label"])
    rows = ds.take_all()
    assert sorted(r["id"] for r in rows) == sorted(
        r["id"]
        for s in manifest["splits"]["train"]["shards"]
        for r in pq.read_table(
            io.BytesIO(client.get_object(Bucket="robustfm-test", Key=f"datasets/folder/{s['file']}")["Body"].read()),
            columns=["id"],
        ).to_pylist()
    )
    assert len(rows) == tree.total("train")
    source = ShardBatchSource(output, "train", 16, 4, train=True, seed=0)
    batches = list(source.batches(0, 0, 1, 0))
    assert len(batches) == tree.total("train") // 4 and batches[0]["image"].shape == (4, 3, 16, 16)


@pytest.mark.timeout(240)
def test_prepare_reads_a_source_tree_from_s3(ray_session, tmp_path, s3_server):
    import boto3

    tree = make_imagenet_tree(tmp_path / "src", n_classes=2, per_class=3, val_per_class=1, size=32, bad_files=True)
    client = boto3.client("s3", endpoint_url=s3_server)
    for path in tree.root.rglob("*"):
        if path.is_file():
            client.put_object(
                Bucket="robustfm-test", Key=f"imagenet/{path.relative_to(tree.root).as_posix()}", Body=path.read_bytes()
            )
    summary = run(_config("s3://robustfm-test/imagenet", tmp_path / "out", "imagenet", shard_size=4))
    assert summary.counts_per_class == tree.counts
    assert {s["path"]: s["reason"] for s in summary.skipped} == tree.skipped
    assert load_manifest(Location(str(tmp_path / "out")))["source"]["root"] == "s3://robustfm-test/imagenet"
