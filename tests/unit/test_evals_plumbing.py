"""Evaluation plumbing without Ray: model references, configs, data, protocol, registry and the report card."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from robustfm.config import ConfigError, load_config
from robustfm.evals import SUITES
from robustfm.evals.config import EvalConfig, EvalDataConfig, EvaluateJobConfig
from robustfm.evals.data import decode_batch, ids_hash, synthetic_rows
from robustfm.evals.metrics import MetricSpec
from robustfm.evals.model_ref import ModelRef, ModelRefError, parse_model_ref
from robustfm.evals.protocol import build_protocol
from robustfm.evals.report import write_report_card
from robustfm.evals.runner import SuiteResult
from robustfm.evals.suite import Plot


def test_import_is_light():
    heavy = ("ray", "mlflow", "open_clip", "torch")
    code = f"import sys, robustfm.evals, robustfm.evals.config; print([m for m in {heavy!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_registry_lists_the_shipped_suites_and_each_declares_directions():
    shipped = ["classification", "corruption_detection", "covar", "embedding_robustness", "faithfulness"]
    shipped += ["feature_inversion", "knn_detection"]
    shipped += ["landmark_retrieval", "relevance_alignment", "retrieval"]
    shipped += ["two_afc", "zero_shot"]
    assert SUITES.names() == shipped
    for name in SUITES.names():
        suite_class = SUITES.get(name)
        assert suite_class.name == name and suite_class.version
        assert suite_class.metric_specs and all(s.direction in ("higher", "lower") for s in suite_class.metric_specs)
        assert isinstance(EvalConfig().suites[name], SUITES.meta(name)["config"])
    with pytest.raises(KeyError, match="did you mean 'zero_shot'"):
        SUITES.get("zero_shoot")


@pytest.mark.parametrize(
    "text,name,pretrained",
    [
        ("open_clip/tiny-vit", "open_clip/tiny-vit", None),
        ("open_clip/ViT-B-32@openai", "open_clip/ViT-B-32", "openai"),
        ("timm/vit_base_patch16_224@augreg_in21k", "timm/vit_base_patch16_224", "augreg_in21k"),
    ],
)
def test_parse_registered_names(text, name, pretrained):
    ref = parse_model_ref(text)
    assert (ref.name, ref.pretrained, ref.label) == (name, pretrained, text)


def test_parse_weights_paths(tmp_path):
    import torch
    from safetensors.torch import save_file

    with_meta = tmp_path / "export" / "model.safetensors"
    with_meta.parent.mkdir()
    save_file({"w": torch.zeros(1)}, str(with_meta), metadata={"model_name": "open_clip/tiny-vit"})
    assert parse_model_ref(str(with_meta)).name == "open_clip/tiny-vit"
    assert parse_model_ref(str(with_meta.parent)).pretrained == str(with_meta.resolve())  # a checkpoint dir
    exported = tmp_path / "cgclip" / "image_tower.safetensors"  # as robustfm.models.export writes it
    exported.parent.mkdir()
    save_file({"w": torch.zeros(1)}, str(exported), metadata={"format": "open_clip", "arch": "ViT-B-32"})
    assert parse_model_ref(str(exported)).name == "open_clip/ViT-B-32"

    bare = tmp_path / "run" / "ckpt" / "weights.safetensors"
    bare.parent.mkdir(parents=True)
    save_file({"w": torch.zeros(1)}, str(bare))
    with pytest.raises(ModelRefError, match="family/arch@PATH"):
        parse_model_ref(str(bare))
    (bare.parent.parent / "resolved_config.yaml").write_text("model:\n  name: open_clip/ViT-B-32\n")
    assert parse_model_ref(str(bare)).name == "open_clip/ViT-B-32"
    explicit = parse_model_ref(f"open_clip/tiny-vit@{bare}")
    assert (explicit.name, explicit.pretrained, explicit.label) == (
        "open_clip/tiny-vit",
        str(bare),
        "open_clip/tiny-vit@weights.safetensors",
    )


@pytest.mark.parametrize(
    "text", ["", "tiny-vit", "/no/such/model.safetensors", "open_clip/tiny-vit@/no/such.safetensors"]
)
def test_parse_rejects_bad_refs(text):
    with pytest.raises(ModelRefError):
        parse_model_ref(text)


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"eval\.pool\.max_actors"):
        load_config(EvaluateJobConfig, overrides=["eval.pool.min_actors=3", "eval.pool.max_actors=2"])
    with pytest.raises(ConfigError, match=r"eval\.pool\.resources\.scoring_node: must be positive, got 0"):
        load_config(EvaluateJobConfig, overrides=["eval.pool.resources={scoring_node: 0}"])
    pinned = load_config(EvaluateJobConfig, overrides=["eval.pool.resources={scoring_node: 1}"])
    assert dict(pinned.eval.pool.resources) == {"scoring_node": 1.0}
    with pytest.raises(ConfigError, match=r"eval\.suites\.zero_shot\.templates"):
        load_config(EvaluateJobConfig, overrides=["eval.suites.zero_shot.templates=[no placeholder]"])
    cfg = load_config(EvaluateJobConfig, overrides=["eval.suites.retrieval.ks=[1,2]", "eval.seed=3"])
    assert cfg.eval.suites["retrieval"].ks == (1, 2) and cfg.eval.seed == 3


def test_synthetic_rows_are_deterministic_and_bad_rows_are_skipped_with_a_reason():
    data = EvalDataConfig(synthetic_samples=6, synthetic_bad_images=2, synthetic_image_size=24)
    first, second = synthetic_rows(data, seed=1), synthetic_rows(data, seed=1)
    assert [r["image"] for r in first] == [r["image"] for r in second]
    assert synthetic_rows(data, seed=2)[0]["image"] != first[0]["image"]
    assert all(len(r["captions"]) == 5 for r in first)
    pixels, reasons = decode_batch([r["image"] for r in first], [r["id"] for r in first], 32)
    assert pixels.shape == (4, 3, 32, 32) and pixels.dtype == np.float32 and 0 <= pixels.min() <= pixels.max() <= 1
    assert reasons == [None] * 4 + ["not_an_image"] * 2


def test_ids_hash_ignores_order_and_duplicates():
    assert ids_hash(["b", "a", "a"]) == ids_hash(["a", "b"]) != ids_hash(["a", "c"])


def _protocol(seed=0, model="m", severities=(1, 2)):
    return build_protocol(
        suite="s",
        version="1",
        model={"name": model},
        data=EvalDataConfig(),
        sample_ids=["a", "b"],
        image_size=None,
        seed=seed,
        params={"severities": list(severities)},
        metric_specs=[MetricSpec("auroc", "higher", "d")],
        counts={"scored": 2},
    )


def test_protocol_fingerprint_tracks_what_shapes_numbers_only():
    base = _protocol()
    assert base["data"]["sample_ids_sha256"] == ids_hash(["a", "b"])
    assert base["metrics"] == {"auroc": {"direction": "higher", "definition": "d"}}
    assert _protocol(model="other")["fingerprint"] == base["fingerprint"]  # the model is what is compared
    assert _protocol(seed=1)["fingerprint"] != base["fingerprint"]
    assert _protocol(severities=(3,))["fingerprint"] != base["fingerprint"]


def _result(tmp_path, model, auroc, radius, fingerprint_seed=0):
    plot = Plot("curve", "A curve", "x", "y", {"mean": ([0.0, 1.0], [1.0, auroc])})
    return SuiteResult(
        suite="s",
        model=model,
        metrics={"all/auroc": auroc, "all/radius": radius},
        directions={"all/auroc": "higher", "all/radius": "lower"},
        table=[],
        plots=[plot],
        protocol=_protocol(seed=fingerprint_seed, model=model),
        counts={"scored": 2, "skipped": 1},
        artifact_dir=tmp_path / model,
    )


def test_report_card_side_by_side_uses_directions(tmp_path):
    a = _result(tmp_path, "pretrained", auroc=0.6, radius=0.3)
    b = _result(tmp_path, "robust", auroc=0.8, radius=0.4)
    path = write_report_card([a], tmp_path / "report", compare_with=[b])
    text = path.read_text()
    assert "pretrained" in text and "robust" in text
    assert "| all/auroc | higher | 0.6000 | 0.8000 | 0.2000 | B |" in text
    assert "| all/radius | lower | 0.3000 | 0.4000 | 0.1000 | A |" in text
    png = tmp_path / "report" / "plots" / "s__curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png.relative_to(path.parent).as_posix()})" in text


def test_report_card_refuses_to_compare_different_protocols(tmp_path):
    a = _result(tmp_path, "a", auroc=0.6, radius=0.3)
    b = _result(tmp_path, "b", auroc=0.8, radius=0.4, fingerprint_seed=5)
    text = write_report_card([a], tmp_path / "report", compare_with=[b]).read_text()
    assert "Not compared" in text and "| B |" not in text


def test_model_ref_label_defaults():
    assert ModelRef("open_clip/tiny-vit").label == "open_clip/tiny-vit"
    assert ModelRef("open_clip/tiny-vit", str(Path("/x/y.safetensors"))).label == "open_clip/tiny-vit@y.safetensors"


def test_shipped_config_loads():
    cfg = load_config(EvaluateJobConfig, Path(__file__).resolve().parents[2] / "configs" / "evaluate" / "cluster.yaml")
    assert cfg.eval.pool.max_actors == 8 and cfg.eval.suites["retrieval"].data.shards.startswith("s3://")
