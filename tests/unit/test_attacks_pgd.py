"""PGD as RobustVLM trains: step pattern, analytic optimum, momentum, constraints, scoring."""

from __future__ import annotations

import pytest
import torch
from _attack_models import interior_images, linear_classifier, mlp

from robustfm.attacks import AttackConfig, pgd


def _analytic_linf(model, x, labels, eps):
    w = model[1].weight.detach()
    return x - eps * torch.sign(w[labels] - w[1 - labels]).reshape(x.shape)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 7])
def test_zero_start_moves_one_step_per_iteration_until_eps(steps):
    model = linear_classifier()
    x = interior_images(4)
    labels = model(x).argmax(1)
    config = AttackConfig(eps=4 / 255, steps=steps, random_start=False)
    result = pgd(model, x, {"labels": labels}, config)
    moved = (result.x_adv - x).abs()
    # a linear model has a constant sign gradient: k steps of 1/255 each, capped at eps = 4/255
    torch.testing.assert_close(moved, torch.full_like(moved, min(steps, 4) / 255), atol=1e-6, rtol=0)
    torch.testing.assert_close(result.x_adv, x + (result.x_adv - x).sign() * min(steps, 4) / 255)
    if steps >= 4:
        torch.testing.assert_close(result.x_adv, _analytic_linf(model, x, labels, 4 / 255), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_start_reaches_the_analytic_linf_optimum(seed):
    model = linear_classifier(seed=seed)
    x = interior_images(6, seed=seed)
    labels = model(x).argmax(1)
    config = AttackConfig(eps=4 / 255, steps=10, seed=seed)  # from anywhere in the ball, 8 steps of 1/255 suffice
    result = pgd(model, x, {"labels": labels}, config)
    torch.testing.assert_close(result.x_adv, _analytic_linf(model, x, labels, 4 / 255), atol=1e-6, rtol=0)
    clean_loss = torch.nn.functional.cross_entropy(model(x), labels, reduction="none")
    assert (result.loss > clean_loss).all()  # the scored loss is the loss at the returned points
    expected = torch.nn.functional.cross_entropy(model(result.x_adv), labels, reduction="none")
    torch.testing.assert_close(result.loss, expected.detach())


def test_l2_reaches_the_analytic_optimum_and_stays_on_the_ball():
    model = linear_classifier(seed=3)
    x = interior_images(5, seed=3)
    labels = model(x).argmax(1)
    eps = 0.1
    config = AttackConfig(norm="l2", eps=eps, steps=60, step_size=0.02)
    result = pgd(model, x, {"labels": labels}, config)
    w = model[1].weight.detach()
    direction = (w[labels] - w[1 - labels]).reshape(x.shape)
    optimum = x - eps * direction / direction.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(result.x_adv, optimum, atol=1e-3, rtol=0)
    norms = (result.x_adv - x).flatten(1).norm(dim=1)
    assert (norms <= eps + 1e-6).all()


def test_momentum_keeps_the_previous_direction_where_the_gradient_is_zero():
    # Pixels of channel 0 do not reach the output: their gradient is 0, sign(0.9 v + 0) keeps v, which is 0 from the
    # start; pixels that matter move 1/255 per step. Then: with a zero-start, channel 0 never moves.
    model = linear_classifier()
    with torch.no_grad():
        model[1].weight.view(2, 3, 4, 4)[:, 0] = 0
    x = interior_images(3)
    labels = model(x).argmax(1)
    result = pgd(model, x, {"labels": labels}, AttackConfig(eps=4 / 255, steps=2, random_start=False))
    assert (result.x_adv[:, 0] == x[:, 0]).all()
    torch.testing.assert_close((result.x_adv[:, 1:] - x[:, 1:]).abs(), torch.full_like(x[:, 1:], 2 / 255))
    assert (result.zero_grad_steps == 0).all()  # the gradient is zero in some pixels, not in a whole row


def test_every_row_is_attacked_even_when_already_misclassified():
    model = linear_classifier()
    x = interior_images(6)
    wrong = 1 - model(x).argmax(1)  # every row starts misclassified
    result = pgd(model, x, {"labels": wrong}, AttackConfig(eps=4 / 255, steps=4, random_start=False))
    assert ((result.x_adv - x).abs().amax(dim=(1, 2, 3)) > 3.9 / 255).all()
    assert result.success.all()


def test_score_last_false_skips_the_final_forward():
    model = mlp()
    x = interior_images(3)
    calls = []

    def forward(points):
        calls.append(points.requires_grad)
        return model(points)

    config = AttackConfig(eps=4 / 255, steps=3)
    result = pgd(forward, x, {"labels": torch.zeros(3, dtype=torch.long)}, config, score_last=False)
    assert calls == [True, True, True]
    assert result.loss is None and result.success is None
    calls.clear()
    result = pgd(forward, x, {"labels": torch.zeros(3, dtype=torch.long)}, config)
    assert calls == [True, True, True, False]
    assert result.loss.shape == (3,) and result.success.dtype == torch.bool
    assert result.gradient_evaluations == 3 and result.config["attack"] == "pgd"
