"""PGD with momentum, as RobustVLM trains FARE and TeCoA (``train/pgd_train.py``), batched and sync-free.

Per step, on the perturbation delta (paper 003 App. A, "following the scheme in [43]")::

    g     = normalize(grad_delta sum_rows loss(x + delta))    # sign (Linf) or g/||g||_2 per row (L2)
    v     = normalize(0.9 * v + g)
    delta = project(delta + step_size * v)                     # clamp to +-eps / shrink to the L2 ball per row
    delta = clamp(x + delta, 0, 1) - x

and the last iterate is returned. Differences from RobustVLM, on purpose:

- the random start U(-eps, eps) is clamped into [0,1] before the first forward (RobustVLM's first gradient is taken
  at pixels outside [0,1], images that cannot exist); the update rule is the same;
- for L2, RobustVLM also starts from U(-eps, eps) per pixel (far outside an L2 ball of radius eps); we start on the
  ball's sphere, as auto-attack does;
- a NaN gradient is not zeroed with a print: its row is reported ``failed`` (see :mod:`robustfm.attacks.common`).

For Linf the momentum barely matters: the renormalized velocity is sign(0.9 v + sign g) = sign g wherever g != 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from robustfm.attacks.common import (
    AttackResult,
    Ball,
    Forward,
    attack_session,
    evaluate,
    random_start,
    score,
    unit_direction,
)
from robustfm.attacks.config import AttackConfig
from robustfm.attacks.objectives import Target

#: RobustVLM's momentum on the normalized gradient.
PGD_MOMENTUM = 0.9


def pgd(
    forward: Forward,
    x: torch.Tensor,
    target: Target,
    config: AttackConfig,
    generator: torch.Generator | None = None,
    *,
    row_seeds: Sequence[int] | None = None,
    eval_modules: nn.Module | Sequence[nn.Module] | None = None,
    score_last: bool = True,
) -> AttackResult:
    """Maximize ``config.objective`` around every row of ``x`` with ``config.steps`` PGD steps.

    Every row is attacked, whether the model already gets it wrong or not. ``config.restarts``, ``early_stop`` are
    APGD's; PGD runs once.

    Args:
        forward: ``[0,1] pixels (B, ...) -> outputs`` as the objective expects (logits, embeddings). Pass the bare
            module, not a DDP wrapper: the attack's backward must not trigger gradient reduction.
        x: clean [0,1] pixels (B, ...); fp32 or wider is kept, lower precision is promoted to fp32.
        target: the objective's tensors (``OBJECTIVES.meta(name)["needs"]``), each with the batch as first dim.
        config: the attack; ``step_size`` is the fixed step (RobustVLM: 1/255).
        generator: draws the random start; default: a new generator on x's device seeded with ``config.seed``.
            The global RNG is never touched.
        row_seeds: one int per row: each row's start is drawn from its own seed, the same in any batch.
        eval_modules: modules held in eval mode during the attack (default: ``forward`` when it is a module).
        score_last: also run one forward (no backward) at the returned points to report their loss and success;
            a training step that runs its own forward on them can skip it (``loss``/``success`` are then None).

    Returns:
        An :class:`AttackResult` whose ``x_adv`` is the last iterate.
    """
    with attack_session(forward, x, target, config, generator, eval_modules) as inputs:
        objective, x = inputs.objective, inputs.x
        failed = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        zero_steps = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
        # The iterate is kept as a point (x + delta), so the [0,1] clamp is exact, not x + (clamped - x).
        x_adv = random_start(x, config, inputs.generator, row_seeds, restart=0)
        velocity = torch.zeros_like(x)
        ball = Ball(x, config.norm, config.eps)
        for _ in range(config.steps):
            step = evaluate(forward, objective, x_adv, target, config, with_success=False)
            failed |= step.bad
            zero_steps += step.zero
            velocity = unit_direction(PGD_MOMENTUM * velocity + unit_direction(step.grad, config.norm), config.norm)
            x_adv = ball.project(x_adv + config.step_size * velocity)
        loss = success = None
        if score_last:
            loss, success, bad = score(forward, objective, x_adv, target, config)
            failed |= bad
    return AttackResult(
        x_adv=x_adv.detach(),
        loss=loss,
        success=success,
        x_success=None,
        failed=failed,
        zero_grad_steps=zero_steps,
        gradient_evaluations=config.steps,
        config={"attack": "pgd", **config.record()},
    )
