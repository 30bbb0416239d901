"""APGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness ..."), batched and sync-free.

Per iteration k, with a per-row step eta (2*eps at the start), on the points x_k::

    z_{k+1} = P(x_k + eta * s(grad f(x_k)))                        # s: sign (Linf) or g/||g||_2 (L2)
    x_{k+1} = P(x_k + a (z_{k+1} - x_k) + (1 - a)(x_k - x_{k-1}))   # a = 0.75; 1.0 at the first step

At each checkpoint w_j (:func:`checkpoint_schedule`) a row halves its step and restarts from its best point (and
that point's gradient) when

    (i)  #{i in [w_{j-1}, w_j): f(x_{i+1}) > f(x_i)} <= rho * (w_j - w_{j-1}),  rho = 0.75, or
    (ii) it did not halve at the previous checkpoint and its best loss has not improved since.

Conventions, where the paper and the reference code (auto-attack, torchattacks) differ:

- (i) uses ``<=`` as the code does (the paper writes ``<``); the two differ when 0.75 * interval is an integer.
- At the first checkpoint the paper's count starts with f(x_1) > f(x_0), the start point's loss; we follow the
  paper. The code compares f(x_1) with a not-yet-written zero instead (an extra "increase" for every row with a
  positive loss, none for a negative one), which makes the rule depend on the loss's sign.
- After a restart from the best point, the momentum term of the next step is x_best - x_k, as in the code.
- Random start: see :func:`~robustfm.attacks.common.random_start` (Linf: U(-eps, eps) per pixel, as
  perceptual-metrics' ``use_rs`` draws it; auto-attack scales U(-1,1) noise to an exact Linf norm of eps).

Every row is attacked (torchattacks attacks only correctly classified rows and returns the others clean).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from robustfm.attacks.common import (
    AttackResult,
    Ball,
    Forward,
    attack_session,
    evaluate,
    per_row,
    random_start,
    unit_direction,
)
from robustfm.attacks.config import AttackConfig
from robustfm.attacks.objectives import Objective, Target

APGD_MOMENTUM = 0.75
"""Weight a of the new step against the previous one (1 - a) in the momentum update."""
APGD_RHO = 0.75
"""Condition (i): halve when at most rho of the interval's steps increased the loss."""
APGD_INITIAL_STEP = 2.0
"""The first step size, in units of eps (alpha = 2 for Linf and L2)."""


def checkpoint_schedule(steps: int) -> list[int]:
    """The iterations after which APGD checks its step size: w_1 = max(int(0.22 N), 1); the interval then
    shrinks by max(int(0.03 N), 1) down to max(int(0.06 N), 1) (auto-attack's integer form of the paper's
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)). N=10: 2, 3, ..., 10; N=100: 22, 41, 57, 70, 80, 87, 93, 99."""
    interval = max(int(0.22 * steps), 1)
    shrink, floor = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    points, at = [], interval
    while at <= steps:
        points.append(at)
        interval = max(interval - shrink, floor)
        at += interval
    return points


@dataclass
class _Run:
    x_best: torch.Tensor
    loss_best: torch.Tensor
    success: torch.Tensor | None
    x_success: torch.Tensor
    failed: torch.Tensor
    zero_grad_steps: torch.Tensor
    evaluations: int


def apgd(
    forward: Forward,
    x: torch.Tensor,
    target: Target,
    config: AttackConfig,
    generator: torch.Generator | None = None,
    *,
    row_seeds: Sequence[int] | None = None,
    eval_modules: nn.Module | Sequence[nn.Module] | None = None,
) -> AttackResult:
    """Maximize ``config.objective`` around every row of ``x`` with APGD, ``config.restarts`` times.

    Args:
        forward: ``[0,1] pixels (B, ...) -> outputs`` as the objective expects. Pass the bare module, not a DDP
            wrapper: the attack's backward must not trigger gradient reduction.
        x: clean [0,1] pixels (B, ...); fp32 or wider is kept, lower precision is promoted to fp32.
        target: the objective's tensors (``OBJECTIVES.meta(name)["needs"]``), each with the batch as first dim.
        config: the attack (``step_size`` is PGD's and is ignored; APGD starts at 2*eps).
        generator: draws the random starts; default: a new generator on x's device seeded with ``config.seed``.
        row_seeds: one int per row: each row's starts are drawn from its own seed, the same in any batch.
        eval_modules: modules held in eval mode during the attack (default: ``forward`` when it is a module).

    Returns:
        An :class:`AttackResult`: ``x_adv``/``loss`` the best-loss points over all restarts; ``success`` whether
        any iterate of any restart (start points included) succeeded, with ``x_success`` such a point.
    """
    with attack_session(forward, x, target, config, generator, eval_modules) as inputs:
        objective, x = inputs.objective, inputs.x
        rows = x.shape[0]
        x_best, x_success = x.clone(), x.clone()
        loss_best = torch.full((rows,), float("-inf"), dtype=x.dtype, device=x.device)
        success = torch.zeros(rows, dtype=torch.bool, device=x.device) if objective.success is not None else None
        failed = torch.zeros(rows, dtype=torch.bool, device=x.device)
        zero_steps = torch.zeros(rows, dtype=torch.int64, device=x.device)
        evaluations = 0
        for restart in range(config.restarts):
            start = random_start(x, config, inputs.generator, row_seeds, restart)
            run = _single_run(forward, objective, x, start, target, config, success)
            evaluations += run.evaluations
            improved = run.loss_best > loss_best
            loss_best = torch.where(improved, run.loss_best, loss_best)
            x_best = torch.where(per_row(improved, x), run.x_best, x_best)
            if success is not None and run.success is not None:
                # A row keeps the point of the first restart that fooled it (the first restart's start otherwise).
                take = run.success & ~success if restart > 0 else torch.ones_like(success)
                x_success = torch.where(per_row(take, x), run.x_success, x_success)
                success = success | run.success
            failed |= run.failed
            zero_steps += run.zero_grad_steps
            if config.early_stop and success is not None and bool(success.all()):
                break
    return AttackResult(
        x_adv=x_best,
        loss=loss_best,
        success=success,
        x_success=x_success if success is not None else None,
        failed=failed,
        zero_grad_steps=zero_steps,
        gradient_evaluations=evaluations,
        config={"attack": "apgd", **config.record()},
    )


def _single_run(
    forward: Forward,
    objective: Objective,
    x: torch.Tensor,
    start: torch.Tensor,
    target: Target,
    config: AttackConfig,
    already: torch.Tensor | None,
) -> _Run:
    """One APGD run from ``start``; ``already`` (rows fooled by earlier restarts) only serves the early stop."""
    norm, eps = config.norm, config.eps
    ball = Ball(x, norm, eps)
    with_success = objective.success is not None
    now = evaluate(forward, objective, start, target, config, with_success)
    evaluations = 1
    x_cur = x_prev = x_best = start
    x_success = start.clone()
    grad = grad_best = now.grad
    loss_best = now.loss
    success = now.success
    failed, zero_steps = now.bad.clone(), now.zero.long()
    step = torch.full((x.shape[0],), APGD_INITIAL_STEP * eps, dtype=x.dtype, device=x.device)
    history = torch.empty((config.steps + 1, x.shape[0]), dtype=x.dtype, device=x.device)
    history[0] = now.loss  # the paper's f(x_0): the first checkpoint's count starts from the start point
    checks = _checkpoint_intervals(config.steps)
    reduced_last = torch.ones_like(failed)  # so that condition (ii) cannot fire at the first checkpoint
    best_at_last_check = loss_best.clone()

    for i in range(config.steps):
        a = 1.0 if i == 0 else APGD_MOMENTUM
        momentum, x_prev = x_cur - x_prev, x_cur
        z = ball.project(x_cur + per_row(step, x) * unit_direction(grad, norm))
        x_cur = ball.project(x_cur + a * (z - x_cur) + (1 - a) * momentum)

        now = evaluate(forward, objective, x_cur, target, config, with_success)
        evaluations += 1
        failed |= now.bad
        zero_steps += now.zero
        if success is not None and now.success is not None:
            x_success = torch.where(per_row(now.success, x), x_cur, x_success)  # the last fooling iterate
            success = success | now.success
        history[i + 1] = now.loss
        improved = now.loss > loss_best
        x_best = torch.where(per_row(improved, x), x_cur, x_best)
        grad_best = torch.where(per_row(improved, x), now.grad, grad_best)
        loss_best = torch.where(improved, now.loss, loss_best)
        grad = now.grad

        interval = checks.get(i + 1)
        if interval is not None:
            reduce = halving_rows(history[i + 1 - interval : i + 2], reduced_last, best_at_last_check, loss_best)
            step = torch.where(reduce, step / 2, step)
            x_cur = torch.where(per_row(reduce, x), x_best, x_cur)
            grad = torch.where(per_row(reduce, x), grad_best, grad)
            reduced_last, best_at_last_check = reduce, loss_best.clone()

        if config.early_stop and success is not None:
            fooled = success if already is None else success | already
            if bool(fooled.all()):  # the one host sync, opt-in
                break
    return _Run(x_best, loss_best, success, x_success, failed, zero_steps, evaluations)


def halving_rows(
    losses: torch.Tensor, reduced_last: torch.Tensor, best_at_last_check: torch.Tensor, loss_best: torch.Tensor
) -> torch.Tensor:
    """Which rows halve their step at a checkpoint.

    Args:
        losses: (k + 1, B): the loss at the iterate before the interval (the start point's at the first
            checkpoint, the paper's convention) and at each of the interval's k iterates.
        reduced_last: (B,) whether the row halved at the previous checkpoint (all True before the first one).
        best_at_last_check: (B,) the best loss at the previous checkpoint (the start loss before the first one).
        loss_best: (B,) the best loss now.

    Returns:
        (B,) bool: condition (i), at most rho * k increases (``<=``, as in the code), or condition (ii), no
        halving last time and no improvement of the best loss since.
    """
    interval = losses.shape[0] - 1
    increases = (losses[1:] > losses[:-1]).sum(dim=0)
    oscillating = increases <= APGD_RHO * interval
    stalled = ~reduced_last & (best_at_last_check >= loss_best)
    return oscillating | stalled


def _checkpoint_intervals(steps: int) -> dict[int, int]:
    """{checkpoint iteration: length of the interval it closes}."""
    points = checkpoint_schedule(steps)
    return {at: at - before for before, at in zip([0, *points[:-1]], points, strict=True)}
