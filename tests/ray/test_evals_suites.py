"""Every suite through the scoring pool with 2 single-threaded actors, on a tiny CLIP and generated data.

The suites run once per module (logged to a SQLite MLflow store in tmp); each test then checks one suite's numbers
against an independent computation on the driver (sklearn on the same scores, brute-force enclosing balls and
recall loops, the model called directly), or what the MLflow runs hold. A rerun with an injected actor crash must
give the same counts and bit-identical metrics.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from robustfm.evals.config import ActorPoolConfig, EvalConfig, EvalDataConfig, SuiteSettings
from robustfm.evals.suites.corruption_detection import CorruptionDetectionConfig
from robustfm.evals.suites.embedding_robustness import EmbeddingRobustnessConfig
from robustfm.evals.suites.retrieval import RetrievalConfig
from robustfm.evals.suites.zero_shot import ZeroShotConfig

pytestmark = [pytest.mark.ray]

SAMPLES, BAD = 12, 2
SUITE_NAMES = ("corruption_detection", "zero_shot", "embedding_robustness", "retrieval")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny CLIP saved as safetensors with its architecture in the metadata (the exported-model path)."""
    import torch

    from robustfm.models import create_model
    from robustfm.models.weights import save_weights

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_weights(create_model("open_clip/tiny-vit"), path, metadata={"model_name": "open_clip/tiny-vit"})
    return path


@pytest.fixture(scope="module")
def driver_model(weights):
    from robustfm.models import create_model

    return create_model("open_clip/tiny-vit", pretrained=str(weights)).eval()


def small_config(output_dir) -> EvalConfig:
    data = EvalDataConfig(synthetic_samples=SAMPLES, synthetic_bad_images=BAD, synthetic_image_size=32)
    return EvalConfig(
        seed=7,
        output_dir=str(output_dir),
        pool=ActorPoolConfig(min_actors=2, max_actors=2, num_cpus=1, threads=1, batch_size=3),
        suites=SuiteSettings.build(
            {
                "corruption_detection": CorruptionDetectionConfig(
                    data=data,
                    corruptions=("gaussian_noise", "pixelate", "brightness", "impulse_noise", "saturate"),
                    severities=(1, 3, 5),
                ),
                "zero_shot": ZeroShotConfig(
                    data=data,
                    corruptions=("gaussian_noise",),
                    severities=(3,),
                    perturbations=("brightness", "jpeg_quality"),
                    perturbation_steps=2,
                ),
                "embedding_robustness": EmbeddingRobustnessConfig(
                    data=data, perturbations=("brightness", "gaussian_noise"), steps=4
                ),
                "retrieval": RetrievalConfig(data=data, captions_per_image=3, ks=(1, 2, 5)),
            }
        ),
    )


@pytest.fixture(scope="module")
def tracked(ray_session, weights, tmp_path_factory):
    """All four suites, nested under one parent run of a fresh SQLite MLflow store."""
    from robustfm.config import TrackingConfig
    from robustfm.evals.runner import run_suite
    from robustfm.tracking import create_tracker

    root = tmp_path_factory.mktemp("evals")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = create_tracker(TrackingConfig(uri=uri, experiment="evals-test"))
    cfg = small_config(root / "out")
    with tracker.start_run("evaluate tiny") as parent:
        results = {
            name: run_suite(name, str(weights), cfg, tracker, parent.run_id, keep_rows=True) for name in SUITE_NAMES
        }
        parent_id = parent.run_id
    tracker.close()
    return {"results": results, "uri": uri, "parent": parent_id, "cfg": cfg, "root": root}


def decoded(ids, size):
    """The same pixels the actors saw, decoded on the driver."""
    from robustfm.evals.data import decode_batch, synthetic_rows

    rows = {
        r["id"]: r
        for r in synthetic_rows(
            EvalDataConfig(synthetic_samples=SAMPLES, synthetic_bad_images=BAD, synthetic_image_size=32), seed=7
        )
    }
    pixels, reasons = decode_batch([rows[i]["image"] for i in ids], list(ids), size)
    assert all(r is None for r in reasons)
    return pixels, rows


@pytest.mark.timeout(900)
def test_counts_pool_and_skips(tracked):
    for name, result in tracked["results"].items():
        assert result.counts["scored"] == SAMPLES - BAD, name
        assert result.counts["skipped"] == BAD and result.counts["skipped/not_an_image"] == BAD, name
        assert len(set(result.rows["actor_pid"].tolist())) == 2, f"{name}: both actors of the pool scored batches"
        assert result.protocol["counts"] == result.counts
        assert result.protocol["data"]["num_samples"] == SAMPLES


@pytest.mark.timeout(120)
def test_corruption_detection_against_sklearn_and_the_model(tracked, driver_model):
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    from robustfm.corruptions import corrupt_batch
    from robustfm.evals.suites.corruption_detection import drawn_severity, in_probe_train_split
    from robustfm.seeding import sample_seed

    result = tracked["results"]["corruption_detection"]
    rows = {k: v[result.rows["status"] == "ok"] for k, v in result.rows.items()}
    section = tracked["cfg"].suites["corruption_detection"]
    ids = rows["id"].astype(str)
    corruption = rows["corruption"].astype(str)
    labels = (corruption != "clean").astype(int)

    # The actors' embeddings and zero-shot scores are the model's, on the seeded corruptions.
    clean_ids = ids[corruption == "clean"]
    pixels, _ = decoded(clean_ids, driver_model.image_size)
    severities = [drawn_severity(i, "pixelate", list(section.severities), 7) for i in clean_ids]
    seeds = [sample_seed(i, 0, "eval_corruption/pixelate", 7) for i in clean_ids]
    with torch.inference_mode():
        clean = driver_model.encode_image(torch.from_numpy(pixels), normalize=True).numpy()
        pixelated = driver_model.encode_image(
            corrupt_batch(torch.from_numpy(pixels), ["pixelate"] * len(seeds), severities, seeds), normalize=True
        ).numpy()
        texts = [
            driver_model.encode_text(list(p), normalize=True).mean(0)
            for p in (section.clean_prompts, section.corrupt_prompts)
        ]
        texts = torch.stack([t / t.norm() for t in texts])
        expected_p = torch.softmax(driver_model.logit_scale.exp() * torch.from_numpy(clean) @ texts.T, dim=1)[:, 1]
    np.testing.assert_allclose(rows["embedding"][corruption == "clean"], clean, atol=1e-5)
    np.testing.assert_allclose(rows["embedding"][corruption == "pixelate"], pixelated, atol=1e-5)
    np.testing.assert_allclose(rows["p_corrupt"][corruption == "clean"], expected_p.numpy(), atol=1e-5)
    assert sorted(set(rows["severity"][labels == 1].tolist())) <= [1, 3, 5]

    # Metrics against sklearn on the same scores, per subset.
    test = ~np.array([in_probe_train_split(i, section.probe_train_fraction, 7) for i in ids])
    fit = ~test & ((corruption == "clean") | np.isin(corruption, ["gaussian_noise", "pixelate", "brightness"]))
    probe = LogisticRegression(C=section.probe_c, max_iter=2000, class_weight="balanced").fit(
        rows["embedding"][fit].astype(np.float64), labels[fit]
    )
    scores = {"zero_shot": rows["p_corrupt"], "probe": probe.predict_proba(rows["embedding"].astype(np.float64))[:, 1]}
    subsets = {
        "all": test,
        "set/unseen": test & np.isin(corruption, ["clean", "impulse_noise", "saturate"]),
        "corruption/brightness": test & np.isin(corruption, ["clean", "brightness"]),
        "severity/5": test & ((corruption == "clean") | (rows["severity"] == 5)),
    }
    for detector, (subset, mask) in itertools.product(scores, subsets.items()):
        y, s = labels[mask], scores[detector][mask]
        # balanced: each clean row weighs (corrupted count / clean count), as in paper 000's balanced sets
        weight = np.where(y == 1, 1.0, (y == 1).sum() / (y == 0).sum())
        got = {f: result.metrics[f"{detector}/{subset}/{f}"] for f in ("accuracy", "auroc", "f1")}
        assert got["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9), (detector, subset)
        assert got["f1"] == pytest.approx(f1_score(y, s > 0.5, sample_weight=weight), abs=1e-9), (detector, subset)
        assert got["accuracy"] == pytest.approx(accuracy_score(y, s > 0.5, sample_weight=weight), abs=1e-9), (
            detector,
            subset,
        )


@pytest.mark.timeout(120)
def test_zero_shot_against_brute_force(tracked, driver_model):
    import torch

    result = tracked["results"]["zero_shot"]
    rows = {k: v[result.rows["status"] == "ok"] for k, v in result.rows.items()}
    condition = rows["condition"].astype(str)
    assert (
        set(condition)
        == {"clean", "gaussian_noise:3", "brightness:0.3", "brightness:1.7", "jpeg_quality:10", "jpeg_quality:100"}
        or len(set(condition)) == 6
    )
    clean_ids = rows["id"][condition == "clean"].astype(str)
    pixels, source = decoded(clean_ids, driver_model.image_size)
    class_names = result.params["class_names"]
    assert class_names == [source[f"synthetic-{k:06d}"]["class_name"] for k in range(len(class_names))]
    with torch.inference_mode():
        image = driver_model.encode_image(torch.from_numpy(pixels), normalize=True)
        classes = []
        for name in class_names:
            mean = driver_model.encode_text(
                [t.format(name) for t in tracked["cfg"].suites["zero_shot"].templates], normalize=True
            ).mean(0)
            classes.append(mean / mean.norm())
        expected_logits = (image @ torch.stack(classes).T).numpy()
    np.testing.assert_allclose(rows["logits"][condition == "clean"], expected_logits, atol=1e-5)
    for name in set(condition):
        mask = condition == name
        pairs = list(zip(rows["logits"][mask], rows["label"][mask], strict=True))
        top1 = np.mean([row.argmax() == y for row, y in pairs])
        top5 = np.mean([y in np.argsort(-row)[:5] for row, y in pairs])
        assert result.metrics[f"{name}/top1"] == pytest.approx(top1)
        assert result.metrics[f"{name}/top5"] == pytest.approx(top5)
    assert result.directions["clean/top1"] == "higher" and result.directions["corruptions/top1_drop"] == "lower"


@pytest.mark.timeout(120)
def test_embedding_robustness_against_brute_force_ball(tracked, driver_model):
    import torch

    from robustfm.perturbations import perturb, sweep
    from robustfm.seeding import sample_seed
    from robustfm.testing.enclosing_ball import brute_force_enclosing_radius

    result = tracked["results"]["embedding_robustness"]
    rows = {k: v[result.rows["status"] == "ok"] for k, v in result.rows.items()}
    perturbation = rows["perturbation"].astype(str)
    for name in ("brightness", "gaussian_noise"):
        mask = perturbation == name
        ids = rows["id"][mask].astype(str)[:3]
        pixels, _ = decoded(ids, driver_model.image_size)
        images = torch.from_numpy(pixels)
        with torch.inference_mode():
            clean = driver_model.encode_image(images, normalize=True).double().numpy()
            versions = []
            for step, value in enumerate(sweep(name, 4)):
                gens = [torch.Generator().manual_seed(sample_seed(i, 0, f"eval_perturb/{name}/{step}", 7)) for i in ids]
                versions.append(driver_model.encode_image(perturb(images, name, value, gens), normalize=True).double())
        points = torch.stack(versions, dim=1).numpy()
        for index in range(len(ids)):
            np.testing.assert_allclose(rows["cosines"][mask][index], points[index] @ clean[index], atol=1e-5)
            assert rows["radius"][mask][index] == pytest.approx(brute_force_enclosing_radius(points[index]), abs=1e-5)
        assert result.metrics[f"{name}/mean_cosine"] == pytest.approx(rows["cosines"][mask].mean())
        assert result.metrics[f"{name}/worst_cosine"] == pytest.approx(rows["cosines"][mask].min(axis=1).mean())
        assert result.metrics[f"{name}/divergence_radius"] == pytest.approx(rows["radius"][mask].mean())
    assert result.directions["brightness/divergence_radius"] == "lower"


@pytest.mark.timeout(120)
def test_retrieval_against_brute_force_recall(tracked, driver_model):
    import torch

    result = tracked["results"]["retrieval"]
    ids = result.rows["id"][result.rows["status"] == "ok"].astype(str)
    pixels, source = decoded(ids, driver_model.image_size)
    with torch.inference_mode():
        images = driver_model.encode_image(torch.from_numpy(pixels), normalize=True).numpy()
        captions = [c for i in ids for c in source[i]["captions"][:3]]
        texts = driver_model.encode_text(captions, normalize=True).numpy()
    owner = [k // 3 for k in range(len(captions))]
    for k in (1, 2, 5):
        i2t = np.mean([any(owner[j] == q for j in np.argsort(-(texts @ images[q]))[:k]) for q in range(len(ids))])
        t2i = np.mean([owner[c] in np.argsort(-(images @ texts[c]))[:k] for c in range(len(captions))])
        assert result.metrics[f"image_to_text/recall_at_{k}"] == pytest.approx(i2t)
        assert result.metrics[f"text_to_image/recall_at_{k}"] == pytest.approx(t2i)


@pytest.mark.timeout(120)
def test_mlflow_holds_one_nested_run_per_suite(tracked):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracked["uri"])
    experiment = client.get_experiment_by_name("evals-test")
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{tracked['parent']}'"
    )
    by_name = {run.info.run_name: run for run in children}
    assert sorted(by_name) == sorted(f"eval/{name}" for name in SUITE_NAMES)
    for name, result in tracked["results"].items():
        run = by_name[f"eval/{name}"]
        assert run.info.run_id == result.run_id and run.info.status == "FINISHED"
        for key, value in result.metrics.items():
            if np.isfinite(value):
                assert run.data.metrics[key] == pytest.approx(value), (name, key)
        assert run.data.metrics["counts/skipped"] == BAD
        assert run.data.params["data.sample_ids_sha256"] == result.protocol["data"]["sample_ids_sha256"]
        assert run.data.tags["protocol_fingerprint"] == result.protocol["fingerprint"]
        top = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"table.csv", "table.json", "protocol.json", "metrics.json", "plots"} <= top, (name, top)
        plots = [a.path for a in client.list_artifacts(run.info.run_id, "plots")]
        assert plots and all(p.endswith(".png") for p in plots), (name, plots)


@pytest.mark.timeout(900)
def test_rerun_with_a_crashed_actor_gives_identical_numbers(tracked, tmp_path):
    """The first batch of the first actor kills its process: Ray restarts it, retries the batch, nothing changes."""
    from robustfm.evals.runner import run_suite

    first = tracked["results"]["corruption_detection"]
    marker = tmp_path / "crashed-once"
    again = run_suite(
        "corruption_detection",
        first.protocol["model"]["pretrained"],
        tracked["cfg"],
        keep_rows=True,
        crash_once_marker=str(marker),
    )
    assert marker.exists(), "the injected crash did not happen"
    assert again.counts == first.counts
    assert again.metrics == first.metrics  # bit-identical, not approximately equal
    assert again.protocol["fingerprint"] == first.protocol["fingerprint"]
    np.testing.assert_array_equal(again.rows["id"], first.rows["id"])
