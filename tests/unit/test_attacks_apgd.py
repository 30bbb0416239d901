"""APGD: checkpoints, the step-halving rule, analytic optima, restarts, early stop, and robust accuracy limits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _attack_models import Bumpy, interior_images, linear_classifier, mlp, trained_classifier
from torch import nn

from robustfm.attacks import OBJECTIVES, AttackConfig, apgd, checkpoint_schedule, pgd
from robustfm.attacks.apgd_attack import halving_rows


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (10, [2, 3, 4, 5, 6, 7, 8, 9, 10]),
        (100, [22, 41, 57, 70, 80, 87, 93, 99]),
        (50, [11, 21, 30, 38, 45]),
        (200, [44, 82, 114, 140, 160, 174, 186, 198]),
        (1, [1]),
    ],
)
def test_checkpoint_schedule(steps, expected):
    assert checkpoint_schedule(steps) == expected


def test_first_checkpoint_counts_from_the_start_loss():
    # Paper convention: the first interval's count starts with f(x_1) > f(x_0). Here f(x_0)=3 > f(x_1)=2 (no
    # increase), f(x_2)=2.5 > f(x_1) (one increase): 1 <= 0.75 * 2 -> halve. The reference code compares f(x_1) with
    # an unwritten 0 (an "increase"), counts 2 > 1.5 and would not halve.
    losses = torch.tensor([[3.0], [2.0], [2.5]])
    no = torch.tensor([False])
    reduce = halving_rows(
        losses, reduced_last=torch.tensor([True]), best_at_last_check=torch.tensor([3.0]), loss_best=torch.tensor([3.0])
    )
    assert reduce.tolist() == [True]
    rising = torch.tensor([[1.0], [2.0], [3.0]])  # two increases of two: keep the step
    assert halving_rows(rising, torch.tensor([True]), torch.tensor([1.0]), torch.tensor([3.0])).tolist() == [False]
    # condition (ii): not halved last time and the best loss did not improve since -> halve, despite the increases
    assert halving_rows(rising, no, torch.tensor([3.0]), torch.tensor([3.0])).tolist() == [True]
    assert halving_rows(rising, no, torch.tensor([2.9]), torch.tensor([3.0])).tolist() == [False]


def test_condition_one_uses_less_or_equal():
    # interval 4, rho 0.75: exactly 3 increases -> halve (code's <=; the paper's < would keep the step)
    three = torch.tensor([[0.0], [1.0], [2.0], [3.0], [2.5]])
    four = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
    keep = dict(reduced_last=torch.tensor([True]), best_at_last_check=torch.tensor([0.0]))
    assert halving_rows(three, loss_best=torch.tensor([3.0]), **keep).tolist() == [True]
    assert halving_rows(four, loss_best=torch.tensor([4.0]), **keep).tolist() == [False]


@pytest.mark.parametrize("random_start", [False, True])
@pytest.mark.parametrize("steps", [10, 100])
def test_reaches_the_analytic_linf_optimum(random_start, steps):
    model = linear_classifier(seed=1)
    x = interior_images(8, seed=1)
    labels = model(x).argmax(1)
    eps = 4 / 255
    result = apgd(model, x, {"labels": labels}, AttackConfig(eps=eps, steps=steps, random_start=random_start))
    w = model[1].weight.detach()
    optimum = x - eps * torch.sign(w[labels] - w[1 - labels]).reshape(x.shape)
    torch.testing.assert_close(result.x_adv, optimum, atol=1e-6, rtol=0)
    expected = F.cross_entropy(model(optimum), labels, reduction="none").detach()
    torch.testing.assert_close(result.loss, expected)
    assert result.gradient_evaluations == steps + 1


def test_reaches_the_analytic_l2_optimum():
    model = linear_classifier(seed=2)
    x = interior_images(5, seed=2)
    labels = model(x).argmax(1)
    eps = 0.2
    result = apgd(model, x, {"labels": labels}, AttackConfig(norm="l2", eps=eps, steps=100))
    w = model[1].weight.detach()
    direction = (w[labels] - w[1 - labels]).reshape(x.shape)
    optimum = x - eps * direction / direction.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(result.x_adv, optimum, atol=1e-4, rtol=0)
    assert ((result.x_adv - x).flatten(1).norm(dim=1) <= eps + 1e-6).all()


def test_tiny_eps_gives_clean_results():
    model, x, labels = trained_classifier()
    clean_logits = model(x).detach()
    result = apgd(model, x, {"labels": labels}, AttackConfig(eps=1e-8, steps=10))
    assert torch.equal(result.success, clean_logits.argmax(1) != labels)
    assert (result.x_adv - x).abs().max() <= 1e-8 + torch.finfo(torch.float32).eps  # eps is below an fp32 ulp
    pgd_result = pgd(model, x, {"labels": labels}, AttackConfig(eps=1e-8, steps=10))
    assert torch.equal(pgd_result.success, clean_logits.argmax(1) != labels)
    torch.testing.assert_close(pgd_result.loss, result.loss, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        result.loss, F.cross_entropy(clean_logits, labels, reduction="none"), atol=1e-5, rtol=1e-4
    )


def test_large_eps_drives_robust_accuracy_to_zero():
    model, x, labels = trained_classifier()
    clean_accuracy = (model(x).argmax(1) == labels).float().mean()
    assert clean_accuracy > 0.95
    small = apgd(model, x, {"labels": labels}, AttackConfig(eps=1 / 255, steps=20))
    large = apgd(model, x, {"labels": labels}, AttackConfig(eps=0.5, steps=20))
    assert (~small.success).float().mean() > 0.9  # the blobs are far apart: 1/255 cannot cross
    assert (~large.success).float().mean() < 0.02
    assert not large.failed.any()
    # x_success really fools the model, and stays in the ball
    assert (model(large.x_success).argmax(1) != labels)[large.success].all()
    assert ((large.x_success - x).abs().amax(dim=(1, 2, 3)) <= 0.5 + 1e-6).all()
    # PGD with a step to match gets there too
    pgd_result = pgd(model, x, {"labels": labels}, AttackConfig(eps=0.5, steps=20, step_size=0.05))
    assert (~pgd_result.success).float().mean() < 0.05


def test_every_row_is_attacked_even_when_already_misclassified():
    model = mlp()
    x = interior_images(6)
    wrong = (model(x).argmax(1) + 1) % 3
    result = apgd(model, x, {"labels": wrong}, AttackConfig(eps=4 / 255, steps=10))
    clean_loss = F.cross_entropy(model(x), wrong, reduction="none").detach()
    assert (result.loss > clean_loss).all()
    assert result.success.all()  # misclassified at the start point already


def test_restarts_keep_each_rows_best_and_success():
    # Restarts draw their starts one after another from the generator: two single-restart runs that share one
    # generator are exactly restarts 0 and 1 of a two-restart run.
    model = Bumpy(seed=4)
    x = interior_images(24, seed=4)
    labels = model(x).argmax(1)
    config = AttackConfig(eps=0.01, steps=3)
    both = apgd(
        model, x, {"labels": labels}, AttackConfig(eps=0.01, steps=3, restarts=2), torch.Generator().manual_seed(9)
    )
    shared = torch.Generator().manual_seed(9)
    first = apgd(model, x, {"labels": labels}, config, shared)
    second = apgd(model, x, {"labels": labels}, config, shared)
    # the test means something: the restarts disagree on success for some rows and on the best loss for others
    assert 0 < first.success.sum() < 24 and not torch.equal(first.success, second.success)
    assert 0 < (second.loss > first.loss).sum() < 24
    assert torch.equal(both.success, first.success | second.success)
    torch.testing.assert_close(both.loss, torch.maximum(first.loss, second.loss))
    take_second = (second.loss > first.loss).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(both.x_adv, torch.where(take_second, second.x_adv, first.x_adv))
    take_second = (second.success & ~first.success).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(both.x_success, torch.where(take_second, second.x_success, first.x_success))
    assert both.gradient_evaluations == 8


def test_early_stop_ends_once_every_row_is_fooled():
    model, x, labels = trained_classifier()
    x, labels = x[::16], labels[::16]
    full = apgd(model, x, {"labels": labels}, AttackConfig(eps=0.5, steps=30, objective="ce"))
    early = apgd(model, x, {"labels": labels}, AttackConfig(eps=0.5, steps=30, restarts=3, early_stop=True))
    assert full.success.all() and early.success.all()
    assert full.gradient_evaluations == 31
    assert early.gradient_evaluations < 31  # stopped inside the first restart, and skipped the other two


class _Angle(nn.Module):
    """x (B, 1) -> the unit embedding at angle 3x: with the inversion objective toward angle 0.9 the loss is
    -(2 - 2 cos(3x - 0.9)), a smooth bump with its top at x = 0.3 that APGD overshoots and must halve its step for."""

    def __init__(self) -> None:
        super().__init__()
        self.points: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.points.append(x.detach().clone())
        return torch.cat((torch.cos(3 * x), torch.sin(3 * x)), dim=1)


_TOWARD = torch.tensor([[math.cos(0.9), math.sin(0.9)]], dtype=torch.float64)


def _loss_and_grad(x: float) -> tuple[float, float]:
    point = torch.tensor([[x]], dtype=torch.float64, requires_grad=True)
    loss = OBJECTIVES.get("inversion").loss(
        torch.cat((torch.cos(3 * point), torch.sin(3 * point)), 1), {"target": _TOWARD}
    )
    (grad,) = torch.autograd.grad(loss.sum(), point)
    return float(loss.detach()), float(grad)


def _reference_apgd(x: float, eps: float, steps: int) -> tuple[list[float], int]:
    """APGD on one scalar, written from the paper's algorithm with the documented conventions; returns the points
    evaluated and how many times the step was halved."""
    lo, hi = max(x - eps, 0.0), min(x + eps, 1.0)
    project = lambda v: min(max(v, lo), hi)
    loss, grad = _loss_and_grad(x)
    current, previous, points, history = x, x, [x], [loss]
    best, best_point, best_grad = loss, x, grad
    eta, reduced_last, best_last, last_check, halvings = 2 * eps, True, best, 0, 0
    checks = set(checkpoint_schedule(steps))
    for i in range(steps):
        a = 1.0 if i == 0 else 0.75
        z = project(current + eta * math.copysign(1.0, grad) * (grad != 0))
        current, previous = project(current + a * (z - current) + (1 - a) * (current - previous)), current
        loss, grad = _loss_and_grad(current)
        points.append(current)
        history.append(loss)
        if loss > best:
            best, best_point, best_grad = loss, current, grad
        if i + 1 in checks:
            k = i + 1 - last_check
            increases = sum(history[j + 1] > history[j] for j in range(last_check, i + 1))
            reduce = increases <= 0.75 * k or (not reduced_last and best_last >= best)
            if reduce:
                eta, current, grad, halvings = eta / 2, best_point, best_grad, halvings + 1
            reduced_last, best_last, last_check = reduce, best, i + 1
    return points, halvings


@pytest.mark.parametrize("steps", [10, 25])
def test_trajectory_matches_a_scalar_reference_of_the_algorithm(steps):
    starts = [0.55, 0.62, 0.1, 0.8]
    model = _Angle()
    x = torch.tensor(starts, dtype=torch.float64).reshape(-1, 1)
    config = AttackConfig(eps=0.35, steps=steps, objective="inversion", random_start=False)
    result = apgd(model, x, {"target": _TOWARD.expand(4, 2)}, config)
    ours = torch.cat(model.points, dim=1)  # (rows, steps + 1): every point each row was evaluated at
    total_halvings = 0
    for row, start in enumerate(starts):
        points, halvings = _reference_apgd(start, 0.35, steps)
        total_halvings += halvings
        torch.testing.assert_close(ours[row], torch.tensor(points, dtype=torch.float64), atol=1e-12, rtol=0)
    assert total_halvings >= len(starts)  # the step-size rule was exercised, not just the first steps
    top = torch.tensor([0.3, 0.3, 0.3, 0.8 - 0.35], dtype=torch.float64)  # the bump's top, or the ball's edge
    torch.testing.assert_close(result.x_adv.flatten(), top, atol=0.02, rtol=0)
