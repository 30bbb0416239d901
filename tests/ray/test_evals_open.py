"""Open evaluation: a suite registered from outside ``robustfm/evals/suites`` brings its own config; a scorer that
needs gradients runs on the actor pool with autograd (the model frozen, in fp32); embedding scorers keep inference
mode; a suite can reshape its rows (pairs) before scoring; a suite's columns are checked against its data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from robustfm.config import load_config
from robustfm.evals import SUITES
from robustfm.evals.actors import FieldSpec, ScoringActor
from robustfm.evals.config import ActorPoolConfig, EvalConfig, EvalDataConfig
from robustfm.evals.metrics import MetricSpec, MetricTable
from robustfm.evals.suite import Suite, SuiteOutput
from robustfm.evals.suites.zero_shot import ZeroShotConfig, ZeroShotScorer, ZeroShotSuite

pytestmark = [pytest.mark.ray]
SAMPLES = 8
EPS = 8 / 255


@dataclass(frozen=True)
class FgsmConfig:
    """A test-only suite's config: where its images come from and the FGSM step."""

    data: EvalDataConfig = field(default_factory=lambda: EvalDataConfig(synthetic_samples=SAMPLES))
    eps: float = EPS


class FgsmScorer(ScoringActor):
    """Zero-shot logits of each image clean and after one FGSM step on the true class's logit (needs gradients)."""

    needs_gradients = True

    def setup(self) -> None:
        names = self.params["class_names"]
        self.text = self.model.encode_text([f"a photo of a {n}" for n in names], normalize=True)

    def output_fields(self) -> dict[str, FieldSpec]:
        classes = len(self.params["class_names"])
        return {
            "label": (np.int64, ()),
            "clean_logits": (np.float32, (classes,)),
            "adv_logits": (np.float32, (classes,)),
            "grad_norm": (np.float64, ()),
            "inference_mode": (np.bool_, ()),
            "params_frozen": (np.bool_, ()),
            "weights_fp32": (np.bool_, ()),
        }

    def score(self, batch: Mapping[str, np.ndarray], pixels: Any) -> list[dict[str, Any]]:
        import torch

        labels = torch.as_tensor(np.asarray(batch["label"], dtype=np.int64))
        x = pixels.clone().requires_grad_(True)
        logits = self.model.encode_image(x, normalize=True) @ self.text.T
        (grad,) = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), x)
        adversarial = (pixels - EPS * grad.sign()).clamp(0, 1)
        with torch.no_grad():
            adv_logits = self.model.encode_image(adversarial, normalize=True) @ self.text.T
        flags = {
            "inference_mode": torch.is_inference_mode_enabled(),
            "params_frozen": not any(p.requires_grad for p in self.model.parameters()),
            "weights_fp32": all(p.dtype == torch.float32 for p in self.model.parameters()),
        }
        return [
            {"id": i, "label": int(y), "clean_logits": c, "adv_logits": a, "grad_norm": float(g.norm()), **flags}
            for i, y, c, a, g in zip(
                batch["id"], labels, logits.detach().numpy(), adv_logits.numpy(), grad, strict=True
            )
        ]


class FgsmSuite(Suite):
    name = "fgsm_test"
    version = "1"
    scorer = FgsmScorer
    columns = ("label", "class_name")
    metric_specs = (MetricSpec("accuracy", "higher", "top-1 of the zero-shot head"),)

    def scorer_params(self, dataset: Any) -> dict[str, Any]:
        return {"class_names": [f"class {i}" for i in range(self.data.synthetic_classes)]}

    def aggregate(self, rows: Mapping[str, np.ndarray], params: Mapping[str, Any]) -> SuiteOutput:
        metrics = MetricTable()
        for kind in ("clean", "adv"):
            correct = np.argmax(rows[f"{kind}_logits"], axis=1) == rows["label"]
            metrics.add(f"{kind}/accuracy", float(correct.mean()), self.spec("accuracy"))
        return SuiteOutput(metrics, [])


class RecordingZeroShotScorer(ZeroShotScorer):
    """The zero_shot scorer, also recording whether it ran under inference mode."""

    def output_fields(self) -> dict[str, FieldSpec]:
        return {**super().output_fields(), "inference_mode": (np.bool_, ())}

    def score(self, batch: Mapping[str, np.ndarray], pixels: Any) -> list[dict[str, Any]]:
        import torch

        rows = super().score(batch, pixels)
        return [{**row, "inference_mode": torch.is_inference_mode_enabled()} for row in rows]


class RecordingZeroShotSuite(ZeroShotSuite):
    name = "zero_shot_recording"
    scorer = RecordingZeroShotScorer


class PairCosineScorer(ScoringActor):
    """Cosine between the embeddings of the two images of a pair (rows reshaped by the suite)."""

    def output_fields(self) -> dict[str, FieldSpec]:
        return {"cosine": (np.float64, ())}

    def score(self, batch: Mapping[str, np.ndarray], pixels: Any) -> list[dict[str, Any]]:
        import torch

        from robustfm.evals.data import decode_batch

        second, reasons = decode_batch(batch["image_b"], [str(i) for i in batch["id"]], self.model.image_size)
        assert all(r is None for r in reasons)
        a = self.encode_images(pixels)
        b = self.encode_images(torch.from_numpy(second))
        return [{"id": i, "cosine": float(c)} for i, c in zip(batch["id"], (a * b).sum(1).numpy(), strict=True)]


class PairSuite(Suite):
    """Gathers the rows of each label into one pair (the first two ids): a suite that shapes its own dataset."""

    name = "pairs_test"
    version = "1"
    scorer = PairCosineScorer
    columns = ("label",)
    metric_specs = (MetricSpec("cosine", "higher", "mean cosine within pairs"),)

    def shape_dataset(self, dataset: Any) -> Any:
        def pair(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            order = np.argsort(group["id"].astype(str))[:2]
            ids, images = group["id"][order], group["image"][order]
            return {"id": np.asarray([f"{ids[0]}+{ids[1]}"], dtype=object), "image": images[:1], "image_b": images[1:]}

        # One partition: the shuffle's tasks must find a CPU beside the scoring actors on a 2-CPU test Ray.
        return dataset.groupby("label", num_partitions=1).map_groups(pair, batch_format="numpy")

    def aggregate(self, rows: Mapping[str, np.ndarray], params: Mapping[str, Any]) -> SuiteOutput:
        metrics = MetricTable()
        metrics.add("mean/cosine", float(np.mean(rows["cosine"])), self.spec("cosine"))
        return SuiteOutput(metrics, [{"id": i, "cosine": c} for i, c in zip(rows["id"], rows["cosine"], strict=True)])


@pytest.fixture(scope="module")
def registered():
    """The test suites registered for this module only (every other test sees the shipped suites alone)."""
    import sys

    from ray import cloudpickle

    # Ray workers cannot import a test module by name: ship this module's classes by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    SUITES.register("fgsm_test", FgsmSuite, config=FgsmConfig)
    SUITES.register("zero_shot_recording", RecordingZeroShotSuite, config=ZeroShotConfig)
    SUITES.register("pairs_test", PairSuite, config=FgsmConfig)
    yield
    for name in ("fgsm_test", "zero_shot_recording", "pairs_test"):
        SUITES.unregister(name)
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _config(tmp_path, **suites: str) -> EvalConfig:
    pool = ["pool.min_actors=2", "pool.max_actors=2", "pool.batch_size=3", "pool.num_cpus=0.5"]
    overrides = [f"output_dir={tmp_path}", *pool]
    overrides += [f"suites.{key}={value}" for key, value in suites.items()]
    return load_config(EvalConfig, overrides=overrides)


def test_a_suite_brings_its_own_config(registered):
    cfg = load_config(EvalConfig, overrides=["suites.fgsm_test.eps=0.5"])
    assert cfg.suites["fgsm_test"] == FgsmConfig(eps=0.5)
    assert isinstance(cfg.suites["zero_shot"], ZeroShotConfig)  # the shipped suites are all still there


@pytest.mark.timeout(600)
def test_gradient_suite_runs_on_the_pool_with_nonzero_gradients(ray_session, registered, tmp_path):
    from robustfm.evals.runner import run_suite

    result = run_suite("fgsm_test", "open_clip/tiny-vit", _config(tmp_path), keep_rows=True)
    rows = result.rows
    assert result.counts["scored"] == SAMPLES
    assert len(set(rows["actor_pid"].tolist())) == 2, "both actors scored batches"
    assert not rows["inference_mode"].any() and rows["params_frozen"].all() and rows["weights_fp32"].all()
    assert (rows["grad_norm"] > 0).all(), "every image got a non-zero input gradient"
    # The step moves every logit: gradients were real, not detached zeros.
    assert np.abs(rows["adv_logits"] - rows["clean_logits"]).max() > 1e-4
    assert result.metrics["adv/accuracy"] <= result.metrics["clean/accuracy"]


@pytest.mark.timeout(600)
def test_embedding_suites_keep_inference_mode(ray_session, registered, tmp_path):
    from robustfm.evals.runner import run_suite

    settings = {"corruptions": "[gaussian_noise]", "perturbations": "[brightness]", "perturbation_steps": "1"}
    cfg = _config(tmp_path, **{f"zero_shot_recording.{k}": v for k, v in settings.items()})
    result = run_suite("zero_shot_recording", "open_clip/tiny-vit", cfg, keep_rows=True)
    assert result.counts["scored"] == cfg.suites["zero_shot_recording"].data.synthetic_samples
    assert result.rows["inference_mode"].all()


@pytest.mark.timeout(600)
def test_a_suite_can_score_pairs_of_rows(ray_session, registered, tmp_path):
    import torch

    from robustfm.evals.data import decode_batch, synthetic_rows
    from robustfm.evals.runner import run_suite
    from robustfm.models import create_model

    cfg = _config(tmp_path)
    result = run_suite("pairs_test", "open_clip/tiny-vit", cfg, keep_rows=True)
    data = cfg.suites["pairs_test"].data
    rows = sorted(synthetic_rows(data, cfg.seed), key=lambda r: r["id"])
    expected = {}
    torch.manual_seed(cfg.seed)  # the actors build the random-init model from the run seed
    model = create_model("open_clip/tiny-vit").eval()
    for label in range(data.synthetic_classes):
        first, second = [r for r in rows if r["label"] == label][:2]
        pixels, _ = decode_batch([first["image"], second["image"]], ["a", "b"], model.image_size)
        with torch.inference_mode():
            a, b = model.encode_image(torch.from_numpy(pixels), normalize=True)
        expected[f"{first['id']}+{second['id']}"] = float(a @ b)
    assert result.counts["scored"] == data.synthetic_classes
    found = dict(zip(result.rows["id"].tolist(), result.rows["cosine"].tolist(), strict=True))
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        assert found[key] == pytest.approx(value, abs=1e-5)


def test_pool_config_names_a_bad_precision():
    from robustfm.config import ConfigError

    with pytest.raises(ConfigError, match="gradient_precision"):
        load_config(ActorPoolConfig, overrides=["gradient_precision=fp8"])


def test_a_suite_reading_a_column_the_shards_lack_fails_naming_it(ray_session, tmp_path):
    from robustfm.data.demo import write_demo_shards
    from robustfm.data.shards import MissingColumnError
    from robustfm.evals.data import load_eval_dataset

    shards = write_demo_shards(tmp_path / "demo", image_size=32, n_images=8, n_val=4, shard_size=4)
    data = EvalDataConfig(shards=str(shards), split="val")
    with pytest.raises(MissingColumnError, match=r"suite 'needs_masks' reads column\(s\) \['mask'\].*demo"):
        load_eval_dataset(data, 0, ["label", "mask"], reader="suite 'needs_masks'")
