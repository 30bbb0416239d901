"""AttackConfig validation and record, the objective registry, and each objective against a hand computation."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from robustfm.attacks import OBJECTIVES, AttackConfig
from robustfm.config.core import ConfigError


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("eps", 0.0, "> 0"),
        ("eps", -1 / 255, "> 0"),
        ("eps", float("nan"), "> 0"),
        ("norm", "linfty", "did you mean 'linf'"),
        ("norm", "l1", "must be one of"),
        ("objective", "cross_entropy", "must be one of"),
        ("objective", "two_afk", "did you mean 'two_afc'"),
        ("steps", 0, ">= 1"),
        ("steps", 2.5, "integer"),
        ("restarts", 0, ">= 1"),
        ("step_size", 0.0, "> 0"),
        ("precision", "fp16", "must be one of"),
        ("seed", -1, "[0, 2**63)"),
    ],
)
def test_bad_values_name_their_field(field, value, words):
    with pytest.raises(ConfigError) as err:
        AttackConfig(**{field: value})
    assert err.value.field == field
    assert words in str(err.value)
    assert repr(value) in str(err.value) or (isinstance(value, float) and math.isnan(value))


def test_combinations_that_cannot_work_are_rejected():
    with pytest.raises(ConfigError, match="restarts.*random_start is false"):
        AttackConfig(restarts=3, random_start=False)
    with pytest.raises(ConfigError, match="early_stop.*'embedding_l2' does not"):
        AttackConfig(objective="embedding_l2", early_stop=True)
    AttackConfig(objective="two_afc", early_stop=True, restarts=2)  # success-based objective: fine


def test_record_is_plain_json_and_round_trips():
    config = AttackConfig(norm="l2", eps=3.0, steps=100, restarts=2, objective="two_afc", precision="bf16", seed=7)
    record = config.record()
    assert json.loads(json.dumps(record)) == record
    assert record["eps"] == 3.0 and record["norm"] == "l2" and record["objective"] == "two_afc"
    assert AttackConfig.from_record(record) == config
    with pytest.raises(ConfigError, match="stepz"):
        AttackConfig.from_record({**record, "stepz": 3})
    with pytest.raises(ConfigError) as err:
        AttackConfig.from_record({**record, "steps": "ten"})
    assert err.value.field == "steps"


def test_config_and_registry_import_no_torch():
    code = (
        "import sys; from robustfm.attacks import AttackConfig, OBJECTIVES; "
        "AttackConfig(objective='cosine_away'); OBJECTIVES.meta('ce'); assert 'torch' not in sys.modules, 'torch'; "
        "assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules), 'ray'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_attacks_import_no_ray_and_no_model_library():
    code = (
        "import sys; from robustfm.attacks import apgd, pgd; import robustfm.attacks.objectives; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'open_clip', 'timm', 'deepspeed', 'mlflow')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_registry_meta_matches_each_objective(name):
    objective = OBJECTIVES.get(name)
    meta = OBJECTIVES.meta(name)
    assert objective.name == name
    assert tuple(meta["needs"]) == objective.needs
    assert meta["has_success"] == (objective.success is not None)


# --- each objective against a hand computation ------------------------------------------------------------------


def test_ce_loss_and_success():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    ce = OBJECTIVES.get("ce")
    expected = [math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(1.0))]
    torch.testing.assert_close(ce.loss(logits, {"labels": labels}), torch.tensor(expected))
    assert ce.success(logits, {"labels": labels}).tolist() == [False, True]


def test_embedding_l2_is_unnormalized_squared_distance_summed_over_dims():
    emb = torch.tensor([[1.0, 2.0, 3.0]])
    target = torch.tensor([[0.0, 4.0, 3.0]])
    loss = OBJECTIVES.get("embedding_l2").loss(emb, {"target": target})
    assert loss.tolist() == [1.0 + 4.0 + 0.0]
    assert OBJECTIVES.get("embedding_l2").success is None


def test_two_afc_ce_on_unscaled_cosines_and_tie_goes_left():
    two_afc = OBJECTIVES.get("two_afc")
    ref = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    left = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # cos 1 ; cos 1/sqrt2
    right = torch.tensor([[0.0, 3.0], [0.0, 2.0]])  # cos 0 ; cos 1/sqrt2 (tie)
    labels = torch.tensor([1, 1])
    target = {"left": left, "right": right, "labels": labels}
    c = 1 / math.sqrt(2)
    # CE of [cos_l, cos_r] for label 1 = log(1 + exp(cos_l - cos_r))
    expected = [math.log(1 + math.exp(1.0 - 0.0)), math.log(1 + math.exp(c - c))]
    torch.testing.assert_close(two_afc.loss(ref, target), torch.tensor(expected))
    # row 0: right is less similar -> decision left != label 1 -> fooled; row 1: tie -> left -> fooled as well
    assert two_afc.success(ref, target).tolist() == [True, True]
    assert two_afc.success(ref, {**target, "labels": torch.tensor([0, 0])}).tolist() == [False, False]


def test_cosine_away_is_two_minus_two_cosine():
    emb = torch.tensor([[3.0, 4.0]])
    clean = torch.tensor([[1.0, 0.0]])  # cos = 3/5
    loss = OBJECTIVES.get("cosine_away").loss(emb, {"clean": clean})
    torch.testing.assert_close(loss, torch.tensor([2 - 2 * 0.6]))


def test_targeted_set_is_minus_summed_unit_distances():
    emb = torch.tensor([[1.0, 0.0]])
    targets = torch.tensor([[[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0]]])  # unit distances^2: 0, 2, 4
    loss = OBJECTIVES.get("targeted_set").loss(emb, {"targets": targets})
    torch.testing.assert_close(loss, torch.tensor([-6.0]))
    with pytest.raises(ValueError, match=r"\(B, K, D\)"):
        OBJECTIVES.get("targeted_set").loss(emb, {"targets": targets[0]})


def test_inversion_is_minus_unit_distance_to_the_target():
    emb = torch.tensor([[0.0, 2.0]])
    target = torch.tensor([[1.0, 1.0]])  # cos = 1/sqrt2 -> distance^2 = 2 - sqrt2
    loss = OBJECTIVES.get("inversion").loss(emb, {"target": target})
    torch.testing.assert_close(loss, torch.tensor([-(2 - math.sqrt(2))]))


def test_missing_or_misshaped_targets_name_the_key():
    two_afc = OBJECTIVES.get("two_afc")
    with pytest.raises(ValueError, match=r"needs target\['right'\]"):
        two_afc.check_target({"left": torch.zeros(2, 3), "labels": torch.zeros(2)}, batch=2)
    with pytest.raises(ValueError, match=r"target\['labels'\].*batch \(2\)"):
        two_afc.check_target({"left": torch.zeros(2, 3), "right": torch.zeros(2, 3), "labels": torch.zeros(3)}, 2)
