"""CGClipTask: loss names, configure_stage and branches skipped per stage, gradients, groups, config, registry."""

from __future__ import annotations

import math

import pytest
import torch

from robustfm.config import ConfigError, ModelConfig, from_dict
from robustfm.methods import METHODS
from robustfm.methods.cgclip import CGClipModel, CGClipTask, build_cgclip_task
from robustfm.methods.cgclip_config import CGClipConfig
from robustfm.train.config import StageConfig
from robustfm.train.task import StageSpec

CHANNELS = (32, 16, 8)


def tiny_task(**config) -> CGClipTask:
    from robustfm.models import create_model

    torch.manual_seed(0)
    cfg = CGClipConfig(decoder_channels=CHANNELS, **config)
    return CGClipTask(CGClipModel(create_model("open_clip/tiny-vit"), decoder_channels=CHANNELS), cfg)


def tiny_batch(n: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    clean = torch.rand(n, 3, 64, 64, generator=generator)
    corrupted = (clean + 0.3 * torch.randn(n, 3, 64, 64, generator=generator)).clamp(0, 1)
    return {"image": clean, "corrupted": corrupted, "map": torch.rand(n, 1, 64, 64, generator=generator)}


def configure(task: CGClipTask, *losses: str, **settings) -> None:
    """What the engine does before a stage that weights ``losses``."""
    stage = StageConfig(
        trainable=("decoder",), lr={"decoder": 1e-3}, loss_weights=dict.fromkeys(losses, 1.0), settings=settings
    )
    task.configure_stage(StageSpec("stage", stage))


def has_grad(parameters) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in parameters)


def count_decoder_calls(task: CGClipTask) -> list[int]:
    calls = [0]
    task.model.decoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_losses_are_named_finite_scalars():
    losses = tiny_task()(tiny_batch())
    assert set(losses) == {"contrastive", "corruption"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())


def test_tune_gradients_reach_decoder_and_both_encoders():
    task = tiny_task()
    losses = task(tiny_batch())
    (losses["contrastive"] + 1.5 * losses["corruption"]).backward()
    groups = task.param_groups()
    assert has_grad(groups["decoder"]) and has_grad(groups["image_encoder"]) and has_grad(groups["text_encoder"])


def test_corruption_loss_alone_trains_the_image_encoder_through_the_decoder():
    # Stage 3's mechanism: the decoder's gradient regularizes the image tower, down to its first block.
    task = tiny_task()
    configure(task, "corruption")
    task(tiny_batch())["corruption"].backward()
    first_block = task.model.clip.clip.visual.transformer.resblocks[0]
    assert has_grad(first_block.parameters())
    assert has_grad(task.param_groups()["decoder"])
    assert not has_grad(task.param_groups()["text_encoder"])  # text tower not run without the contrastive loss


def test_isolate_with_frozen_encoders_trains_only_the_decoder():
    task = tiny_task()
    groups = task.param_groups()
    for parameter in groups["image_encoder"] + groups["text_encoder"]:
        parameter.requires_grad_(False)
    configure(task, "corruption")
    losses = task(tiny_batch())
    assert set(losses) == {"corruption"}
    losses["corruption"].backward()
    assert has_grad(groups["decoder"])
    assert all(p.grad is None for p in groups["image_encoder"] + groups["text_encoder"])


def test_contrastive_only_skips_the_decoder():
    task = tiny_task()
    calls = count_decoder_calls(task)
    configure(task, "contrastive")
    batch = tiny_batch()
    del batch["map"]  # Adapt needs no ground-truth maps
    losses = task(batch)
    assert set(losses) == {"contrastive"} and calls[0] == 0
    losses["contrastive"].backward()
    assert all(p.grad is None for p in task.param_groups()["decoder"])
    assert has_grad(task.param_groups()["image_encoder"]) and has_grad(task.param_groups()["text_encoder"])
    configure(task, "contrastive", "corruption")
    task(tiny_batch())
    assert calls[0] == 1  # both losses share one image-tower pass and one decoder pass


def test_configure_stage_records_weighted_losses_and_refuses_settings_and_unknown_losses():
    task = tiny_task()
    stage = StageConfig(
        trainable=("decoder",), lr={"decoder": 1e-3}, loss_weights={"contrastive": 0.0, "corruption": 1.0}
    )
    task.configure_stage(StageSpec("isolate", stage))
    assert task.active_losses == frozenset({"corruption"})  # a zero weight is not active
    with pytest.raises(ConfigError) as error:
        configure(task, "contrastive", **{"attack.eps": 0.01})
    assert error.value.field == "stages.stage.settings.attack.eps"
    with pytest.raises(ConfigError, match=r"\['kl'\] are not CG-CLIP losses") as error:
        configure(task, "contrastive", "kl")
    assert error.value.field == "stages.stage.loss_weights"
    assert task.active_losses == frozenset({"corruption"})  # a refused stage leaves the task as it was


def test_unknown_or_empty_active_losses_fail():
    task = tiny_task()
    task.active_losses = frozenset({"contrastive", "kl"})
    with pytest.raises(ValueError, match="active_losses"):
        task(tiny_batch())
    task.active_losses = frozenset()
    with pytest.raises(ValueError, match="active_losses"):
        task(tiny_batch())


def test_bad_batches_fail_with_the_column_name():
    task = tiny_task()
    batch = tiny_batch()
    batch["map"] = torch.rand(3, 1, 32, 32)
    with pytest.raises(ValueError, match="'map' must have shape"):
        task(batch)
    batch = tiny_batch()
    batch["corrupted"] = batch["corrupted"][:2]
    with pytest.raises(ValueError, match="'corrupted'"):
        task(batch)


def test_param_groups_partition_every_parameter():
    from robustfm.train.task import Task, check_param_groups

    task = tiny_task()
    assert isinstance(task, Task)
    groups = task.param_groups()
    check_param_groups(groups, task)
    assert set(groups) == {"image_encoder", "text_encoder", "decoder"}
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in task.parameters()}
    assert any(p is task.model.clip.logit_scale for p in groups["text_encoder"])


def test_clean_half_of_the_decoder_loss_uses_zero_targets():
    batch = tiny_batch()
    with_clean = tiny_task()
    configure(with_clean, "corruption")
    corrupted_only = tiny_task(decoder_on_clean=False)
    configure(corrupted_only, "corruption")
    with torch.no_grad():
        _, logits = with_clean.model.encode_image_and_map(torch.cat([batch["image"], batch["corrupted"]]))
        expected_full = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, torch.cat([torch.zeros_like(batch["map"]), batch["map"]])
        )
        expected_half = torch.nn.functional.binary_cross_entropy_with_logits(logits[3:], batch["map"])
        assert with_clean(batch)["corruption"].item() == pytest.approx(expected_full.item(), rel=1e-5)
        assert corrupted_only(batch)["corruption"].item() == pytest.approx(expected_half.item(), rel=1e-5)


def test_prompts_cycle_per_kind_and_targets_option_changes_the_loss():
    task = tiny_task(clean_prompts=("a clean photograph", "a clean photo"), corrupt_prompts=("a corrupt photograph",))
    assert task.caption_texts(3, 2) == [
        "a clean photograph",
        "a clean photo",
        "a clean photograph",
        "a corrupt photograph",
        "a corrupt photograph",
    ]
    batch = tiny_batch()
    configure(task, "contrastive")
    plain = tiny_task(contrastive_targets="clip")
    configure(plain, "contrastive")
    with torch.no_grad():
        assert abs(task(batch)["contrastive"].item() - plain(batch)["contrastive"].item()) > 1e-4


def test_temperature_fixed_or_trainable():
    trainable = tiny_task(logit_scale_init=50.0)
    assert trainable.logit_scale().item() == pytest.approx(50.0, rel=1e-5)
    configure(trainable, "contrastive")
    trainable(tiny_batch())["contrastive"].backward()
    assert trainable.model.clip.logit_scale.grad is not None

    fixed = tiny_task(logit_scale="fixed", logit_scale_init=20.0)
    configure(fixed, "contrastive")
    fixed(tiny_batch())["contrastive"].backward()
    assert fixed.model.clip.logit_scale.grad is None
    assert fixed.model.clip.logit_scale.item() == pytest.approx(math.log(20.0), rel=1e-6)


def test_temperature_learns_from_the_openai_init_and_is_clamped_after_each_step():
    """At OpenAI's init (1/tau = 100) exp(log 100) is 100.0000076 in float32: a clamp in the forward pass would pass
    no gradient, freezing the temperature eq. 2 learns. The parameter is clamped after the step instead (open_clip)."""
    task = tiny_task(logit_scale_init=100.0)
    configure(task, "contrastive")
    task(tiny_batch())["contrastive"].backward()
    grad = task.model.clip.logit_scale.grad
    assert grad is not None and grad.abs().item() > 0
    with torch.no_grad():
        task.model.clip.logit_scale.add_(0.5)  # a step that overshoots CLIP's bound
    task.after_optimizer_step()
    assert task.model.clip.logit_scale.item() == pytest.approx(math.log(100.0), abs=1e-6)
    assert task.logit_scale().item() <= 100.0 + 1e-3


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"decoder_channels": [384, 0, 96]}, "decoder_channels"),
        ({"tap_blocks": [4, 8]}, "tap_blocks"),
        ({"tap_blocks": [8, 4, 12]}, "tap_blocks"),
        ({"clean_prompts": []}, "clean_prompts"),
        ({"corrupt_prompts": ["a clean photograph"]}, "corrupt_prompts"),
        ({"contrastive_targets": "multi-positive"}, "contrastive_targets"),
        ({"logit_scale_init": -1.0}, "logit_scale_init"),
        ({"logit_scale_init": 500.0}, "logit_scale_init"),
    ],
)
def test_config_errors_name_the_field(data, field):
    with pytest.raises(ConfigError) as error:
        from_dict(CGClipConfig, data, "method")
    assert error.value.field == f"method.{field}"


def test_config_defaults_follow_the_paper():
    cfg = from_dict(CGClipConfig, {"tap_blocks": [4, 8, 12]})
    assert cfg.decoder_channels == (384, 192, 96) and cfg.tap_blocks == (4, 8, 12)
    assert cfg.contrastive_targets == "clip"  # eq. 2 as written


def test_registry_builds_the_task():
    assert "cgclip" in METHODS
    assert METHODS.meta("cgclip")["losses"] == ("contrastive", "corruption")
    assert METHODS.get("cgclip") is build_cgclip_task
    task = build_cgclip_task(ModelConfig(name="open_clip/tiny-vit"), CGClipConfig(decoder_channels=CHANNELS))
    assert task.model.tap_blocks == (1, 2, 4)
    assert set(task(tiny_batch(2))) == {"contrastive", "corruption"}
