"""FARE's task without Ray: its losses against a hand computation, the attack inside forward (eval mode, no .grad,
per-image seeds), the inner maximizers, the stage hook, and a run killed mid-stage that resumes to the same weights."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from robustfm.attacks import AttackConfig, pgd
from robustfm.config import ConfigError, ModelConfig, load_config
from robustfm.methods.fare_config import FAREConfig
from robustfm.seeding import sample_seed
from robustfm.train.config import StageConfig
from robustfm.train.task import StageSpec

TINY = ModelConfig(name="open_clip/tiny-vit")
EPS = 8 / 255


def _task(config: FAREConfig | None = None, model: ModelConfig = TINY):
    from robustfm.methods.fare import build_fare_task

    torch.manual_seed(0)
    return build_fare_task(model, config or FAREConfig(attack=AttackConfig(eps=EPS, steps=3, objective="embedding_l2")))


def _batch(task, n: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    images = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        target = task.model.encode_image(images)  # f0 = the starting encoder
    return {"image": images, "target": target, "attack_seed": torch.arange(100, 100 + n)}


def _stage(weights: dict[str, float], **settings) -> StageSpec:
    return StageSpec(
        "finetune",
        StageConfig(trainable=("image_encoder",), lr={"image_encoder": 1e-3}, loss_weights=weights, settings=settings),
    )


def test_loss_is_zero_at_the_start_with_a_vanishing_radius():
    task = _task(FAREConfig(attack=AttackConfig(eps=1e-8, steps=3, objective="embedding_l2"))).train()
    losses = task(_batch(task))
    assert set(losses) == {"fare", "adversarial", "clean"}
    assert losses["clean"].item() == 0.0  # f(x) == f0(x) at the start
    assert 0 <= losses["fare"].item() < 1e-6


@pytest.mark.parametrize("clean_weight", [0.0, 0.25])
def test_losses_equal_a_hand_computation(clean_weight):
    config = FAREConfig(clean_weight=clean_weight, attack=AttackConfig(eps=EPS, steps=3, objective="embedding_l2"))
    task = _task(config).train()
    batch = _batch(task)
    with torch.no_grad():  # targets away from f(x), so that the clean term is not 0
        batch["target"] = batch["target"] + 0.3 * torch.randn(batch["target"].shape)
    losses = task(batch)
    found = pgd(
        task.model.encode_image,
        batch["image"],
        {"target": batch["target"]},
        config.attack,
        row_seeds=batch["attack_seed"].tolist(),
        eval_modules=task.model,
        score_last=False,
    )
    with torch.no_grad():
        adversarial = (task.model.encode_image(found.x_adv) - batch["target"]).pow(2).sum(1).mean()
        clean = (task.model.encode_image(batch["image"]) - batch["target"]).pow(2).sum(1).mean()
    assert losses["adversarial"].item() == pytest.approx(adversarial.item(), rel=1e-5)
    assert losses["clean"].item() == pytest.approx(clean.item(), rel=1e-5)
    expected = (1 - clean_weight) * adversarial + clean_weight * clean
    assert losses["fare"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses["fare"].requires_grad and adversarial > clean  # the attack pushed the embeddings away


def test_the_attack_leaves_grads_and_train_mode_alone_and_is_the_same_in_any_batch():
    task = _task().train()
    batch = _batch(task, n=4)
    modes = []
    hook = task.model.clip.visual.register_forward_hook(lambda module, *_: modes.append(module.training))
    task(batch)
    hook.remove()
    assert modes[:3] == [False, False, False] and modes[-2:] == [True, True]  # attack in eval, update in train
    assert all(p.grad is None for p in task.parameters())  # the attack's backward touched no .grad
    assert task.model.training
    target = {"target": batch["target"], "clean": batch["target"]}
    whole = task.adversarial_points(task.model.encode_image, batch["image"], target, batch)
    part_batch = {key: value[2:] for key, value in batch.items()}
    part = task.adversarial_points(
        task.model.encode_image, batch["image"][2:], {k: v[2:] for k, v in target.items()}, part_batch
    )
    torch.testing.assert_close(part, whole[2:], atol=1e-6, rtol=0)
    assert (whole - batch["image"]).abs().max() <= EPS + 1e-6 and whole.min() >= 0 and whole.max() <= 1


def test_maximizers_stay_in_the_ball_and_the_sweep_picks_the_worst_edit():
    from robustfm.methods.adversarial import InnerProblem, apgd_points, worst_perturbation
    from robustfm.perturbations import perturb, sweep

    task = _task().eval()
    batch = _batch(task, n=3)
    target = {"target": batch["target"]}
    seeds = batch["attack_seed"].tolist()
    points = apgd_points(InnerProblem(task.model.encode_image, batch["image"], target, task.config, seeds, task.model))
    assert (points - batch["image"]).abs().max() <= EPS + 1e-6
    config = dataclasses.replace(task.config, maximizer="perturbation_sweep", perturbations=("brightness", "hue"))
    worst = worst_perturbation(InnerProblem(task.model.encode_image, batch["image"], target, config, seeds, task.model))
    with torch.no_grad():
        candidates = [perturb(batch["image"], n, v) for n in ("brightness", "hue") for v in sweep(n, 5)]
        losses = torch.stack([(task.model.encode_image(c) - batch["target"]).pow(2).sum(1) for c in candidates])
        expected = torch.stack([candidates[int(i)][row] for row, i in enumerate(losses.argmax(0))])
    torch.testing.assert_close(worst, expected)


def test_needs_follow_the_maximizer_and_the_active_loss():
    task = _task()
    assert task.needs == {"in_task_attack"}
    task.configure_stage(_stage({"fare": 1.0}, maximizer="perturbation_sweep"))
    assert task.needs == frozenset() and task.base_config.maximizer == "pgd"
    task.active_losses = frozenset()  # what a stage weighting another task's losses would leave
    assert task.needs == frozenset() and task(_batch(task)) == {}


def test_the_stage_hook_refuses_weights_on_reported_terms_and_applies_settings():
    task = _task()
    with pytest.raises(ConfigError, match=r"adversarial.*method.clean_weight") as err:
        task.configure_stage(_stage({"fare": 1.0, "adversarial": 1.0}))
    assert err.value.field == "stages.finetune.loss_weights"
    task.configure_stage(_stage({"fare": 1.0}, **{"attack.eps": 2 / 255}))
    assert task.config.attack.eps == pytest.approx(2 / 255)
    with pytest.raises(ConfigError) as err:
        task.configure_stage(_stage({"fare": 1.0}, **{"attack.eps": 0.0}))
    assert err.value.field == "stages.finetune.settings.attack.eps"


def test_a_missing_attack_seed_column_is_named():
    task = _task()
    batch = _batch(task)
    del batch["attack_seed"]
    with pytest.raises(KeyError, match="attack_seed.*AttackSeeds"):
        task(batch)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ("method.attack.eps=0", "method.attack.eps"),
        ("method.attack.eps=-0.1", "method.attack.eps"),
        ("method.attack.norm=l3", "method.attack.norm"),
        ("method.attack.objective=ce", "method.attack.objective"),
        ("method.attack.objective=embeding_l2", "method.attack.objective"),
        ("method.clean_weight=1.5", "method.clean_weight"),
        ("method.clean_weight=-0.1", "method.clean_weight"),
        ("method.maximizer=pgdd", "method.maximizer"),
        ("train.strategy.zero_stage=3", "train.strategy.zero_stage"),
        (
            ("train.stages.finetune.trainable=[image_encoder,text_encoder]", "train.stages.finetune.lr.text_encoder=1"),
            "train.stages.finetune.trainable",
        ),
        ("eval.settings.suites.zero_shot.attacks=[]", "eval.settings.suites.zero_shot.attacks"),
        ("eval.settings.suites.zero_shot.attacks=[apgd_x]", "eval.settings.suites.zero_shot.attacks"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    from robustfm.recipes.fare_config import FARERecipeConfig

    with pytest.raises(ConfigError) as err:
        load_config(
            FARERecipeConfig, "configs/fare/demo.yaml", [overrides] if isinstance(overrides, str) else overrides
        )
    assert err.value.field == field, str(err.value)


def test_zero3_is_refused_only_with_an_attack_inside_the_task():
    from robustfm.recipes.fare_config import FARERecipeConfig

    zero3 = ["train.strategy.zero_stage=3"]
    with pytest.raises(ConfigError, match="until a GPU run shows it works"):
        load_config(FARERecipeConfig, "configs/fare/demo.yaml", zero3)
    load_config(FARERecipeConfig, "configs/fare/demo.yaml", [*zero3, "method.maximizer=perturbation_sweep"])
    with pytest.raises(ConfigError) as err:  # a stage's settings count too
        load_config(
            FARERecipeConfig,
            "configs/fare/demo.yaml",
            [*zero3, "method.maximizer=perturbation_sweep", "train.stages.finetune.settings={maximizer: apgd}"],
        )
    assert err.value.field == "train.strategy.zero_stage"


def test_shipped_configs_load_with_their_sources():
    from robustfm.recipes.fare_config import FARERecipeConfig

    cfgs = {n: load_config(FARERecipeConfig, f"configs/fare/{n}.yaml") for n in ("vit_l14_robustvlm", "convnext_b")}
    robustvlm = cfgs["vit_l14_robustvlm"]
    stage = robustvlm.train.stages["finetune"]
    assert robustvlm.method.attack.eps == pytest.approx(4 / 255) and robustvlm.method.attack.steps == 10
    assert robustvlm.method.attack.step_size == pytest.approx(1 / 255) and robustvlm.method.clean_weight == 0
    assert stage.lr["image_encoder"] == 1e-5 and stage.weight_decay["image_encoder"] == 1e-4
    assert stage.warmup_steps == 1400 and stage.epochs * stage.max_batches_per_epoch == 20000
    assert robustvlm.train.num_workers * robustvlm.data.batch_size == 128 and robustvlm.train.grad_clip == 0
    assert robustvlm.train.optimizer.betas == (0.9, 0.999) and not robustvlm.train.optimizer.no_decay_1d
    assert cfgs["convnext_b"].model.name == "open_clip/convnext_base_w:224"
    assert robustvlm.headline() == f"zero_shot/attacks_linf:{4 / 255:g}/robust_top1"


class _ImageSource:
    """In-memory images with f0 targets and per-(id, epoch) attack seeds, as the recipe's stages give them."""

    def __init__(self, images: torch.Tensor, target: torch.Tensor, batch_size: int = 4) -> None:
        self.images, self.target, self.batch_size = images, target, batch_size

    def num_batches(self, epoch: int, rank: int, world_size: int) -> int:
        return len(self.images) // self.batch_size

    def batches(self, epoch: int, rank: int, world_size: int, skip_batches: int = 0):
        for index in range(skip_batches, self.num_batches(epoch, rank, world_size)):
            rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
            ids = range(rows.start, rows.stop)
            seeds = torch.tensor([sample_seed(str(i), epoch, "adversarial_start", 0) for i in ids])
            yield {"image": self.images[rows], "target": self.target[rows], "attack_seed": seeds}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_a_run_killed_mid_stage_resumes_to_the_uninterrupted_weights(tmp_path, strategy):
    from robustfm.recipes.kit import TaskBuilder
    from robustfm.train import TrainConfig, fit
    from robustfm.train.loop import InjectedFault

    settings = FAREConfig(attack=AttackConfig(eps=EPS, steps=2, step_size=2 / 255, objective="embedding_l2"))
    builder = TaskBuilder("fare", TINY, settings)
    teacher = builder.initial(seed=3).eval()
    images = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        source = _ImageSource(images, teacher.model.encode_image(images))
    base = {
        "launcher": "local",
        "seed": 3,
        "log_every_steps": 1,
        "checkpoint_every_steps": 1,
        "strategy": {"name": "ddp"} if strategy == "ddp" else {"name": "deepspeed", "zero_stage": 2},
        "stages": {
            "finetune": {
                "trainable": ["image_encoder"],
                "lr": {"image_encoder": 1e-3},
                "epochs": 2,
                "loss_weights": {"fare": 1.0},
            }
        },
    }
    reference = fit(load_config(TrainConfig, base={**base, "storage_path": str(tmp_path / "a")}), builder, source)
    killed = load_config(TrainConfig, base={**base, "storage_path": str(tmp_path / "b"), "fail_at_step": 3})
    with pytest.raises(InjectedFault):
        fit(killed, builder, source)
    resumed = fit(killed, builder, source)
    final, expected = resumed.load_state_dict(), reference.load_state_dict()
    assert resumed.metrics["global_step"] == 4
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    text = [k for k in expected if k.startswith("model.clip.") and not k.startswith("model.clip.visual.")]
    start = teacher.state_dict()
    assert all(torch.equal(final[k], start[k]) for k in text) and "model.clip.logit_scale" in text
    assert not torch.equal(final["model.clip.visual.proj"], start["model.clip.visual.proj"])
    losses = [r["loss/fare"] for r in reference.history if "loss/fare" in r]
    assert all(math.isfinite(v) for v in losses) and len(losses) == 4
    if strategy == "zero2":  # DeepSpeed on CPU did not compile its inference-only shared-memory all-reduce op
        import deepspeed.ops

        assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False


def test_the_sweep_validation_attacks_inside_no_grad():
    """The engine's epoch hook measures under ``torch.no_grad()``; the attack must still take its gradients."""
    from robustfm.recipes.fare import SWEEP, FAREValidation
    from robustfm.recipes.kit import TaskBuilder

    builder = TaskBuilder("fare", TINY, FAREConfig(attack=AttackConfig(eps=EPS, steps=2, objective="embedding_l2")))
    start = builder.initial(seed=0)
    validation = FAREValidation(builder, SWEEP.diverged_values, teacher=lambda device: start.model)
    validation._held_out = {"image": torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(2))}
    metrics = validation("finetune", 1, start.state_dict(), {"loss/total": 1.0})
    assert metrics["val/clean_loss"] < 1e-8 < metrics["val/adversarial_loss"]  # f = f0: only the attack moves it
    assert metrics["val/diverged"] == 0.0


def test_fare_runs_on_a_convnext_tower_at_an_overridden_size():
    """Paper 003's main backbone is a ConvNeXt run at 224 instead of 256: the tiny ConvNeXt at 48 instead of 64."""
    task = _task(model=ModelConfig(name="open_clip/tiny-convnext:48")).train()
    images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = task.model.encode_image(images) + 0.1
    losses = task({"image": images, "target": target, "attack_seed": torch.arange(2)})
    losses["fare"].backward()
    assert losses["adversarial"] > losses["clean"] > 0
    assert all(p.grad is not None for p in task.model.image_parameters())
    assert all(p.grad is None for p in task.model.text_parameters())
