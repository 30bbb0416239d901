"""Paper 004's robustness fine-tuning without Ray: the task's losses, its stage hook, the frozen teacher, the edits
each image gets, the correlation report, and config errors that name the field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from robustfm.config import ConfigError, ModelConfig, load_config
from robustfm.methods.perturb_ft_config import PerturbFTConfig
from robustfm.recipes.perturb_ft_config import PerturbFTRecipeConfig
from robustfm.train.config import StageConfig
from robustfm.train.task import StageSpec

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "perturb_ft" / "demo.yaml"
TINY = ModelConfig(name="open_clip/tiny-vit")


def _task(config: PerturbFTConfig | None = None):
    from robustfm.methods.perturb_ft import build_perturb_ft_task

    torch.manual_seed(0)
    return build_perturb_ft_task(TINY, config or PerturbFTConfig()).eval()


def _stage(**weights: float) -> StageSpec:
    return StageSpec(
        "finetune", StageConfig(trainable=("image_encoder",), lr={"image_encoder": 1e-3}, loss_weights=weights)
    )


def test_losses_equal_a_hand_computation():
    task = _task()
    task.configure_stage(_stage(perturbed=1.0, clean=0.5))
    images, edited = torch.rand(3, 3, 64, 64), torch.rand(3, 3, 64, 64)
    target = torch.randn(3, task.model.embed_dim)
    losses = task({"image": images, "perturbed": edited, "target": target})
    with torch.no_grad():
        expected_perturbed = ((task.model.encode_image(edited) - target) ** 2).sum(1).mean()
        expected_clean = ((task.model.encode_image(images) - target) ** 2).sum(1).mean()
    assert losses["perturbed"].item() == pytest.approx(expected_perturbed.item(), rel=1e-5)
    assert losses["clean"].item() == pytest.approx(expected_clean.item(), rel=1e-5)


def test_loss_is_zero_for_the_starting_model_on_unedited_images():
    task = _task()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        target = task.model.encode_image(images)
    losses = task({"image": images, "perturbed": images, "target": target})
    assert losses["perturbed"].item() == pytest.approx(0.0, abs=1e-8)
    assert losses["clean"].item() == pytest.approx(0.0, abs=1e-8)


def test_stage_hook_skips_inactive_losses_and_applies_settings():
    task = _task()
    task.configure_stage(
        StageSpec(
            "finetune",
            StageConfig(
                trainable=("image_encoder",),
                lr={"image_encoder": 1e-3},
                loss_weights={"perturbed": 1.0, "clean": 0.0},
                settings={"normalize_embeddings": True},
            ),
        )
    )
    images = torch.rand(2, 3, 64, 64)
    losses = task({"image": images, "perturbed": images, "target": torch.randn(2, task.model.embed_dim)})
    assert set(losses) == {"perturbed"}
    assert task.config.normalize_embeddings and not task.base_config.normalize_embeddings
    assert losses["perturbed"].item() <= 4.0 + 1e-6  # unit vectors: squared distance at most 4
    with pytest.raises(ConfigError, match=r"stages\.finetune\.loss_weights"):
        task.configure_stage(_stage(perturbed=1.0, adversarial=1.0))
    with pytest.raises(ConfigError, match=r"stages\.finetune\.settings\.eps"):
        task.configure_stage(
            StageSpec(
                "finetune",
                StageConfig(
                    trainable=("image_encoder",),
                    lr={"image_encoder": 1e-3},
                    loss_weights={"perturbed": 1.0},
                    settings={"eps": 0.1},
                ),
            )
        )


def test_the_teacher_is_the_starting_encoder():
    """f0 of the frozen-model stage, built from the run seed, is the network training starts from (also at random
    init), so the loss is measured against the model the paper calls "original"."""
    from robustfm.data.frozen_stage import EmbeddingLoader
    from robustfm.recipes.kit import TaskBuilder

    cfg = load_config(PerturbFTRecipeConfig, DEMO, ["seed=5"])
    start = TaskBuilder("perturb_ft", cfg.model, cfg.method).initial(cfg.seed).eval()
    teacher = EmbeddingLoader(cfg.model.name, cfg.model.pretrained, init_seed=cfg.seed)("cpu")
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(teacher.encode_image(images), start.model.encode_image(images))
    assert not any(p.requires_grad for p in teacher.parameters())


def test_each_image_gets_one_seeded_edit_whatever_its_batch():
    from robustfm.data.corruption_stages import RandomPerturbBatch
    from robustfm.perturbations import sweep

    names = ("brightness", "jpeg_quality", "gaussian_noise")
    udf = RandomPerturbBatch({n: tuple(sweep(n, 3)) for n in names}, run_seed=1, epoch=0)
    rng = np.random.default_rng(0)
    images = rng.random((6, 3, 32, 32), dtype=np.float32)
    ids = np.array([f"img-{i}" for i in range(6)], dtype=object)
    whole = udf({"id": ids, "image": images})
    parts = [udf({"id": ids[s], "image": images[s]}) for s in (slice(0, 2), slice(2, 6))]
    for key in ("perturbed", "perturbation", "perturbation_value"):
        np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))
    assert set(whole["perturbation"]) <= set(names) and len(set(whole["perturbation"])) > 1
    for name, value in zip(whole["perturbation"], whole["perturbation_value"], strict=True):
        assert value in sweep(name, 3)
    other_epoch = RandomPerturbBatch(udf.grid, run_seed=1, epoch=1)({"id": ids, "image": images})
    assert not np.array_equal(other_epoch["perturbed"], whole["perturbed"])


def test_drop_correlations_on_hand_made_metrics():
    from robustfm.recipes.perturb_ft import drop_correlations

    metrics = {"zero_shot/clean/top1": 0.8}
    for value, cosine, top1 in ((0.2, 0.6, 0.3), (0.6, 0.8, 0.5), (1.0, 0.95, 0.7)):  # more change, more drop
        metrics[f"embedding_robustness/brightness:{value:g}/cosine"] = cosine
        metrics[f"zero_shot/brightness:{value:g}/top1"] = top1
    for value in (10, 55, 100):  # an edit that changes nothing: no correlation can be claimed
        metrics[f"embedding_robustness/jpeg_quality:{value:g}/cosine"] = 1.0
        metrics[f"zero_shot/jpeg_quality:{value:g}/top1"] = 0.8
    metrics["embedding_robustness/brightness/divergence_radius"] = 0.4
    metrics["embedding_robustness/jpeg_quality/divergence_radius"] = 0.0
    found = drop_correlations(metrics)
    assert found["brightness"] == pytest.approx(-1.0)
    assert np.isnan(found["jpeg_quality"])
    assert np.isnan(found["across perturbations (radius vs mean drop)"])  # two points only


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("eval.settings.suites.zero_shot.perturbation_steps=5", "eval.settings.suites.zero_shot.perturbation_steps"),
        ("data.perturbations=[brightnes]", "data.perturbations"),
        ("model.name=timm/tiny-vit", "model.name"),
        ("curriculum=[adapt]", "curriculum"),
        ("data.values_per_perturbation=1", "data.values_per_perturbation"),
    ],
)
def test_bad_config_names_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(PerturbFTRecipeConfig, DEMO, [override])
    assert err.value.field == field, str(err.value)
