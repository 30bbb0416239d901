"""Rules both attacks follow: constraints, batch = rows one by one, model state untouched, failed and zero-gradient
rows reported, seeded determinism, precision inside an outer autocast region, and a real (tiny) CLIP tower."""

from __future__ import annotations

import pytest
import torch
from _attack_models import Bumpy, interior_images, linear_classifier, mlp
from torch import nn

from robustfm.attacks import AttackConfig, apgd, pgd

ATTACKS = {"pgd": pgd, "apgd": apgd}


def _edge_images(rows: int) -> torch.Tensor:
    x = torch.rand((rows, 3, 4, 4), generator=torch.Generator().manual_seed(5))
    x[:, 0, 0] = 0.0  # pixels on the borders of [0,1]: the clamp must hold there
    x[:, 1, 0] = 1.0
    return x


@pytest.mark.parametrize("name", ATTACKS)
@pytest.mark.parametrize(("norm", "eps"), [("linf", 8 / 255), ("l2", 0.5)])
def test_points_stay_in_the_ball_and_in_unit_range(name, norm, eps):
    model = Bumpy()
    x = _edge_images(8)
    labels = model(x).argmax(1)
    config = AttackConfig(norm=norm, eps=eps, steps=12, step_size=eps / 4)
    result = ATTACKS[name](model, x, {"labels": labels}, config)
    points = [result.x_adv] + ([result.x_success] if result.x_success is not None else [])
    for adv in points:
        assert adv.dtype == torch.float32 and adv.shape == x.shape
        assert adv.min() >= 0 and adv.max() <= 1
        delta = (adv - x).flatten(1)
        size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
        assert (size <= eps * (1 + 1e-6)).all()
    assert (result.x_adv != x).any()


@pytest.mark.parametrize("name", ATTACKS)
@pytest.mark.parametrize("random_start", [False, True])
def test_a_batch_is_attacked_as_its_rows_one_by_one(name, random_start):
    model = mlp(dtype=torch.float64)
    x = interior_images(5, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1])
    config = AttackConfig(eps=6 / 255, steps=10, random_start=random_start, restarts=2 if random_start else 1)
    seeds = [11, 12, 13, 14, 15]  # per-row seeds make the random starts independent of the batch
    batch = ATTACKS[name](model, x, {"labels": labels}, config, row_seeds=seeds)
    for i in range(5):
        row = ATTACKS[name](model, x[i : i + 1], {"labels": labels[i : i + 1]}, config, row_seeds=seeds[i : i + 1])
        torch.testing.assert_close(row.x_adv[0], batch.x_adv[i], atol=1e-12, rtol=0)
        torch.testing.assert_close(row.loss[0], batch.loss[i], atol=1e-12, rtol=0)
        assert row.success[0] == batch.success[i]
        if random_start:
            assert not torch.equal(batch.x_adv[i], batch.x_adv[(i + 1) % 5])


@pytest.mark.parametrize("name", ATTACKS)
def test_model_mode_and_gradients_are_left_alone(name):
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.Dropout(0.5), nn.Linear(16, 3))
    model.train()
    model[2].eval()  # a submodule the caller froze on purpose stays frozen after the attack
    seen_modes = []
    model.register_forward_pre_hook(lambda module, args: seen_modes.append(module.training))
    model[3].weight.grad = torch.full_like(model[3].weight, 7.0)  # a gradient the optimizer has not used yet
    x = interior_images(4)
    result = ATTACKS[name](model, x, {"labels": torch.zeros(4, dtype=torch.long)}, AttackConfig(steps=3))
    assert seen_modes and not any(seen_modes)  # every attack forward ran in eval mode (dropout off)
    assert model.training and model[1].training and not model[2].training and model[3].training
    assert model[1].weight.grad is None and model[1].bias.grad is None and model[3].bias.grad is None
    assert torch.equal(model[3].weight.grad, torch.full_like(model[3].weight, 7.0))
    assert all(p.requires_grad for p in model.parameters())
    assert not result.x_adv.requires_grad


class _BrokenRow(nn.Module):
    """A linear classifier whose row ``bad`` gets a NaN logit (``mode="loss"``) or a finite loss with an infinite
    gradient (``mode="grad"``: sqrt at 0), and whose row ``dead`` does not depend on its pixels at all."""

    def __init__(self, mode: str, bad: int = 1, dead: int = 2) -> None:
        super().__init__()
        self.linear = linear_classifier(classes=3)
        self.mode, self.bad, self.dead = mode, bad, dead

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(x.shape[0]).reshape(-1, 1, 1, 1)
        x = torch.where(rows == self.dead, x.detach(), x)
        first = x.flatten(1)[:, 0]
        if self.mode == "loss":
            inside = torch.where(rows.flatten() == self.bad, first - 2, first + 1)  # sqrt(<0) = NaN on one row only
        else:
            inside = torch.where(rows.flatten() == self.bad, first - first.detach(), first + 1)  # d sqrt(0) = inf
        return self.linear(x) + 0.1 * torch.sqrt(inside)[:, None]


@pytest.mark.parametrize("name", ATTACKS)
@pytest.mark.parametrize("mode", ["loss", "grad"])
def test_non_finite_rows_are_failed_and_zero_gradients_counted(name, mode):
    model = _BrokenRow(mode)
    x = interior_images(4)
    labels = torch.tensor([0, 1, 2, 0])
    config = AttackConfig(eps=4 / 255, steps=5)
    result = ATTACKS[name](model, x, {"labels": labels}, config)
    assert result.failed.tolist() == [False, True, False, False]
    assert not result.success[1]  # a failed row is never counted as fooled, nor silently as robust: it is failed
    assert torch.isfinite(result.x_adv).all() and ((result.x_adv - x).abs() <= 4 / 255 + 1e-6).all()
    evaluations = result.gradient_evaluations
    assert result.zero_grad_steps.tolist() == [0, 0, evaluations, 0]
    assert result.summary()["failed"] == 1 and result.summary()["zero_grad_rows"] == 1
    healthy = (result.x_adv[[0, 3]] - x[[0, 3]]).abs().amax(dim=(1, 2, 3))
    assert (healthy > 3.9 / 255).all()  # the other rows were attacked as usual


@pytest.mark.parametrize("name", ATTACKS)
def test_seeded_draws_and_the_global_rng_untouched(name):
    model = Bumpy()
    x = interior_images(6)
    labels = model(x).argmax(1)
    attack = ATTACKS[name]
    state = torch.random.get_rng_state()
    first = attack(model, x, {"labels": labels}, AttackConfig(eps=0.02, steps=3, seed=1))
    again = attack(model, x, {"labels": labels}, AttackConfig(eps=0.02, steps=3, seed=1))
    other = attack(model, x, {"labels": labels}, AttackConfig(eps=0.02, steps=3, seed=2))
    given = attack(model, x, {"labels": labels}, AttackConfig(eps=0.02, steps=3), torch.Generator().manual_seed(1))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first.x_adv, again.x_adv) and torch.equal(first.x_adv, given.x_adv)
    assert not torch.equal(first.x_adv, other.x_adv)


class _DtypeProbe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = linear_classifier(classes=3)
        self.dtypes: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(x)
        self.dtypes.append(logits.dtype)
        return logits


@pytest.mark.parametrize("name", ATTACKS)
@pytest.mark.parametrize(("precision", "expected"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_precision_inside_an_outer_bf16_autocast_region(name, precision, expected):
    model = _DtypeProbe()
    x = interior_images(4)
    labels = torch.tensor([0, 1, 2, 0])
    config = AttackConfig(eps=4 / 255, steps=4, precision=precision)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 training step around the attack
        assert model.linear(x).dtype == torch.bfloat16
        result = ATTACKS[name](model, x, {"labels": labels}, config)
        assert torch.is_autocast_enabled("cpu")  # the outer region is intact afterwards
    assert model.dtypes and set(model.dtypes) == {expected}
    assert result.x_adv.dtype == torch.float32 and result.loss.dtype == torch.float32
    assert ((result.x_adv - x).abs() <= 4 / 255 + 1e-6).all()


def test_bad_inputs_fail_clearly():
    model = mlp()
    labels = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\[0,1\] pixels"):
        apgd(model, interior_images(2) * 255, {"labels": labels}, AttackConfig())
    with pytest.raises(ValueError, match=r"needs target\['labels'\]"):
        pgd(model, interior_images(2), {"label": labels}, AttackConfig())
    with pytest.raises(ValueError, match="row_seeds has 1 seeds for a batch of 2"):
        pgd(model, interior_images(2), {"labels": labels}, AttackConfig(), row_seeds=[3])
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        apgd(model, interior_images(2), {"labels": labels}, AttackConfig())


def test_embedding_objectives_on_the_tiny_clip_tower():
    from robustfm.models import create_model

    model = create_model("open_clip/tiny-vit")
    x = torch.rand((2, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean = model(x)
    eps = 4 / 255
    away = apgd(model, x, {"clean": clean}, AttackConfig(eps=eps, steps=5, objective="cosine_away"))
    assert (away.loss > 1e-4).all() and away.success is None and away.x_success is None
    fare = pgd(model, x, {"target": clean}, AttackConfig(eps=eps, steps=3, objective="embedding_l2"))
    assert (fare.loss > 0).all() and ((fare.x_adv - x).abs() <= eps + 1e-6).all()
    assert not fare.failed.any() and model.training  # the factory's model is in train mode; so it stays
