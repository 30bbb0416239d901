"""TeCoA's task and recipe config without Ray: the zero-shot CE against a hand computation, unlabelled rows, the
cached classifier of the frozen text tower, class names from the manifest or a file (duplicates refused), and shards
without labels refused before Ray starts."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from robustfm.attacks import AttackConfig, pgd
from robustfm.config import ConfigError, ModelConfig, load_config
from robustfm.methods.tecoa_config import TeCoAConfig

TINY = ModelConfig(name="open_clip/tiny-vit")
NAMES = ("cat", "dog", "car", "boat")
DEMO = "configs/tecoa/demo.yaml"


def _task(**changes):
    from robustfm.methods.tecoa import build_tecoa_task

    torch.manual_seed(0)
    attack = AttackConfig(eps=8 / 255, steps=3, objective="ce")
    return build_tecoa_task(TINY, TeCoAConfig(class_names=NAMES, attack=attack, **changes))


def _batch(n: int = 4) -> dict[str, torch.Tensor]:
    images = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return {"image": images, "label": torch.tensor([0, 1, 2, -1])[:n], "attack_seed": torch.arange(n)}


@pytest.mark.parametrize("clean_weight", [0.0, 0.5])
def test_losses_equal_a_hand_computation_and_skip_unlabelled_rows(clean_weight):
    task = _task(clean_weight=clean_weight).train()
    batch = _batch()
    losses = task(batch)
    with torch.no_grad():
        text = F.normalize(task.model.encode_text([f"This is a photo of a {n}" for n in NAMES]), dim=-1)

        def logits(pixels):
            return 100.0 * F.normalize(task.model.encode_image(pixels), dim=-1) @ text.T

    labels = batch["label"]
    found = pgd(
        logits, batch["image"], {"labels": labels.clamp(min=0)}, task.config.attack, row_seeds=[0, 1, 2, 3],
        eval_modules=task.model, score_last=False,
    )  # fmt: skip
    with torch.no_grad():
        adversarial = F.cross_entropy(logits(found.x_adv)[:3], labels[:3])
        clean = F.cross_entropy(logits(batch["image"])[:3], labels[:3])
    assert losses["adversarial"].item() == pytest.approx(adversarial.item(), rel=1e-5)
    assert losses["clean"].item() == pytest.approx(clean.item(), rel=1e-5)
    expected = (1 - clean_weight) * adversarial + clean_weight * clean
    assert losses["tecoa"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert adversarial > clean


def test_a_batch_without_labels_gives_a_zero_loss_not_nan():
    task = _task().train()
    batch = {**_batch(), "label": torch.full((4,), -1)}
    losses = task(batch)
    assert losses["tecoa"].item() == 0.0 and losses["clean"].item() == 0.0


def test_the_classifier_is_cached_and_dropped_when_weights_load():
    task = _task()
    first = task.classifier()
    assert task.classifier() is first
    task.load_state_dict(task.state_dict())
    assert task._classifier is None
    torch.testing.assert_close(task.classifier(), first)
    assert not any(key.endswith("_classifier") for key in task.state_dict())  # never exported


def test_the_task_needs_class_names():
    from robustfm.methods.tecoa import build_tecoa_task

    with pytest.raises(ConfigError) as err:
        build_tecoa_task(TINY, TeCoAConfig())
    assert err.value.field == "method.class_names"


def _manifest(tmp_path, classes, columns=("id", "image", "label", "class_name")):
    shards = tmp_path / "shards"
    shards.mkdir()
    manifest = {"columns": {c: {} for c in columns}, "classes": list(classes), "splits": {"train": {}, "val": {}}}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    return str(shards)


def test_class_names_come_from_the_manifest_or_a_file(tmp_path):
    from robustfm.recipes.tecoa_config import TeCoARecipeConfig, check_paths, class_names_of

    shards = _manifest(tmp_path, NAMES)
    cfg = load_config(TeCoARecipeConfig, DEMO, [f"data.shards={shards}"])
    assert check_paths(cfg) == []
    assert class_names_of(cfg, json.loads((tmp_path / "shards" / "manifest.json").read_text())) == NAMES
    names = tmp_path / "names.txt"
    names.write_text("tabby cat\npuppy\nsports car\nsailboat\n")
    cfg = load_config(TeCoARecipeConfig, DEMO, [f"data.shards={shards}", f"method.class_names_file={names}"])
    assert check_paths(cfg) == []


@pytest.mark.parametrize(
    ("classes", "columns", "names", "words"),
    [
        (NAMES, ("id", "image", "captions"), None, "data.shards: TeCoA needs labelled shards"),
        ((), ("id", "image", "label"), None, "data.shards: TeCoA needs labelled shards"),
        (
            ("crane", "dog", "crane"),
            ("id", "image", "label"),
            None,
            "manifest's class list holds duplicate class names",
        ),
        (NAMES, ("id", "image", "label"), "a\nb\na\nc\n", "method.class_names_file: holds duplicate class names"),
        (NAMES, ("id", "image", "label"), "a\nb\n", "method.class_names_file: has 2 class names, the shards' labels"),
    ],
)
def test_bad_labels_or_names_fail_before_ray_starts(tmp_path, classes, columns, names, words):
    from robustfm.recipes.tecoa_config import TeCoARecipeConfig, check_paths

    overrides = [f"data.shards={_manifest(tmp_path, classes, columns)}"]
    if names is not None:
        (tmp_path / "names.txt").write_text(names)
        overrides.append(f"method.class_names_file={tmp_path / 'names.txt'}")
    problems = check_paths(load_config(TeCoARecipeConfig, DEMO, overrides))
    assert any(words in p for p in problems), problems


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("method.attack.objective=embedding_l2", "method.attack.objective"),
        ("method.class_names=[a,a]", "method.class_names"),
        ("method.template=no braces", "method.template"),
        ("method.logit_scale=0", "method.logit_scale"),
        ("train.strategy.zero_stage=3", "train.strategy.zero_stage"),
    ],
)
def test_bad_config_names_the_field(override, field):
    from robustfm.recipes.tecoa_config import TeCoARecipeConfig

    with pytest.raises(ConfigError) as err:
        load_config(TeCoARecipeConfig, DEMO, [override])
    assert err.value.field == field, str(err.value)


def test_the_job_refuses_bad_input_before_ray_starts(tmp_path, capsys, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tecoa_job", "jobs/tecoa.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    started = []  # this process may already hold the session's Ray: watch the job's own start instead
    import robustfm.recipes.job

    monkeypatch.setattr(robustfm.recipes.job, "init_ray", lambda *args, **kwargs: started.append(args))
    with pytest.raises(SystemExit) as exited:
        job.main(["method.attack.eps=0"])
    assert exited.value.code == 2 and "method.attack.eps: must be > 0" in capsys.readouterr().err
    unlabelled = _manifest(tmp_path, (), ("id", "image"))
    assert job.main([f"data.shards={unlabelled}", f"output_dir={tmp_path}"]) == 2
    assert "TeCoA needs labelled shards" in capsys.readouterr().err
    assert started == []


def test_the_sweep_validation_attacks_inside_no_grad():
    from robustfm.recipes.kit import TaskBuilder
    from robustfm.recipes.tecoa import SWEEP, TeCoAValidation

    attack = AttackConfig(eps=0.3, steps=2, objective="ce")
    builder = TaskBuilder("tecoa", TINY, TeCoAConfig(class_names=NAMES, attack=attack))
    start = builder.initial(seed=0)
    validation = TeCoAValidation(builder, SWEEP.diverged_values)
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        labels = start.logits(images).argmax(1)  # every image right: clean top-1 = 1
    validation._held_out = {"image": images, "label": labels.float()}
    metrics = validation("finetune", 1, start.state_dict(), {"loss/total": 1.0})
    assert metrics["val/clean_top1"] == 1.0 and metrics["val/adversarial_top1"] < 1.0
    assert metrics["val/adversarial_loss"] > 0 and metrics["val/diverged"] == 0.0
