"""What PGD and APGD share: the result type, the forward/backward step, projections, random starts and the
bookkeeping rules (eval mode, precision, seeded draws, failed and zero-gradient rows).

Rules both attacks follow, each guarding against a known failure:

- The gradient is taken with ``torch.autograd.grad`` w.r.t. the input only: parameters' ``.grad`` stay untouched,
  so an attack inside a training step does not leak into the optimizer.
- The model runs in eval mode; each submodule's own training flag is restored afterwards (not a blanket
  ``train()``, which would wake frozen submodules).
- ``precision="fp32"`` disables autocast even inside an outer bf16 autocast region (a bf16 training step);
  ``"bf16"`` autocasts the model only. The perturbation, projection and loss stay fp32 (or the input's dtype when it
  is wider), so a bf16 step cannot round the point out of the eps-ball.
- A non-finite loss or gradient marks its row ``failed`` for good; its gradient is replaced by 0 for the update so
  that the point stays a valid image, but the row is reported, never counted as robust silently (RobustVLM zeroes
  NaN gradients with a print: issue #20).
- Rows whose gradient is exactly zero are counted per step (gradient masking shows up there).
- No host sync in the loops: every per-row decision is a ``torch.where``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from robustfm.attacks.config import AttackConfig
from robustfm.attacks.objectives import Objective, Target
from robustfm.attacks.registry import OBJECTIVES
from robustfm.seeding import sample_seed

Forward = Callable[[torch.Tensor], torch.Tensor]
_TINY = 1e-12  # guards the L2 normalizations against a zero vector (as auto-attack does)


@dataclass
class AttackResult:
    """What an attack returns. Tensors are on the input's device; per-row tensors have shape (B,).

    Attributes:
        x_adv: the attack's answer, in the eps-ball around x and in [0,1]: PGD's last iterate; APGD's highest-loss
            point over all iterates and restarts.
        loss: the loss at ``x_adv`` (APGD: the best loss; -inf for a row whose loss was never finite); None for
            PGD run with ``score=False``.
        success: whether the row was fooled (PGD: at ``x_adv``; APGD: at any iterate of any restart, the start point
            included); None when the objective has no success notion or PGD ran with ``score=False``.
        x_success: APGD only: per row, the last iterate that succeeded in the first restart that succeeded, else
            the start point of the first restart (auto-attack's ``x_best_adv``). None otherwise.
        failed: a non-finite loss or gradient was seen for the row: its numbers are not a robustness measurement.
        zero_grad_steps: per row, how many gradient evaluations returned an all-zero gradient (int64).
        gradient_evaluations: forward+backward passes per row (steps per restart, plus APGD's start points).
        config: :meth:`AttackConfig.record` of the config used, plus ``attack`` (``pgd`` / ``apgd``).
    """

    x_adv: torch.Tensor
    loss: torch.Tensor | None
    success: torch.Tensor | None
    x_success: torch.Tensor | None
    failed: torch.Tensor
    zero_grad_steps: torch.Tensor
    gradient_evaluations: int
    config: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """Counts for a log or a protocol record (syncs with the device once): rows, fooled rows (None without a
        success notion), failed rows, rows that ever had a zero gradient, mean finite loss."""
        loss = None
        if self.loss is not None:
            finite = self.loss[torch.isfinite(self.loss)]
            loss = float(finite.mean()) if finite.numel() else None
        return {
            "rows": int(self.failed.numel()),
            "success": None if self.success is None else int(self.success.sum()),
            "failed": int(self.failed.sum()),
            "zero_grad_rows": int((self.zero_grad_steps > 0).sum()),
            "mean_loss": loss,
        }


def eval_modules_of(forward: Forward, modules: nn.Module | Sequence[nn.Module] | None) -> list[nn.Module]:
    """The modules to hold in eval mode: ``modules`` if given, else ``forward`` itself when it is a module."""
    if modules is None:
        return [forward] if isinstance(forward, nn.Module) else []
    return [modules] if isinstance(modules, nn.Module) else list(modules)


@dataclass(frozen=True)
class AttackInputs:
    """What an attack works on, checked: its objective, the clean points and the generator of its random starts."""

    objective: Objective
    x: torch.Tensor
    """The clean [0,1] pixels, detached, in the work dtype (:func:`work_dtype`)."""
    generator: torch.Generator


@contextlib.contextmanager
def attack_session(
    forward: Forward,
    x: torch.Tensor,
    target: Target,
    config: AttackConfig,
    generator: torch.Generator | None,
    eval_modules: nn.Module | Sequence[nn.Module] | None,
) -> Iterator[AttackInputs]:
    """Check the inputs (before any module changes mode), then hold the attacked modules in eval mode.

    Yields:
        The objective of ``config``, ``x`` in the work dtype, and the caller's generator or a fresh one seeded with
        ``config.seed`` (:func:`attack_generator`).
    """
    objective: Objective = OBJECTIVES.get(config.objective)
    check_inputs(x, objective, target)
    x = x.detach().to(work_dtype(x))
    inputs = AttackInputs(objective, x, attack_generator(x, config, generator))
    with held_in_eval(eval_modules_of(forward, eval_modules)):
        yield inputs


@contextlib.contextmanager
def held_in_eval(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Put ``modules`` in eval mode; restore every submodule's own training flag on exit."""
    flags = [(m, m.training) for root in modules for m in root.modules()]
    for root in modules:
        root.train(False)
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def model_precision(config: AttackConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast region for the model forward: disabled (fp32) or bf16, whatever an outer region says."""
    if config.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """The perturbation's dtype: at least fp32 (fp64 inputs stay fp64, bf16/fp16 inputs are promoted)."""
    return torch.promote_types(x.dtype, torch.float32)


def check_inputs(x: torch.Tensor, objective: Objective, target: Target) -> None:
    """Raise ``ValueError`` for inputs the attacks cannot serve (syncs once, before any loop)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("attacks need autograd: call them outside torch.inference_mode()")
    if not x.is_floating_point() or x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty float batch (B, ...) of [0,1] pixels, got {x.dtype} {tuple(x.shape)}")
    if not bool(((x >= 0) & (x <= 1)).all()):
        raise ValueError("x must hold [0,1] pixels (the models normalize inside); found values outside [0,1]")
    objective.check_target(target, x.shape[0])


@dataclass
class Evaluation:
    """One forward+backward at a batch of points."""

    loss: torch.Tensor  # (B,) fp32-or-wider; non-finite entries replaced by -inf
    grad: torch.Tensor  # like x; non-finite entries replaced by 0
    success: torch.Tensor | None  # (B,) bool, False on bad rows
    bad: torch.Tensor  # (B,) bool: non-finite loss or gradient
    zero: torch.Tensor  # (B,) bool: all-zero (finite) gradient


def evaluate(
    forward: Forward,
    objective: Objective,
    points: torch.Tensor,
    target: Target,
    config: AttackConfig,
    with_success: bool,
) -> Evaluation:
    """Loss, gradient w.r.t. ``points`` only, and optionally success, under the config's precision."""
    points = points.detach().requires_grad_(True)
    with torch.enable_grad():
        with model_precision(config, points.device):
            outputs = forward(points)
        outputs = outputs.to(points.dtype)  # the loss in fp32 (or wider), whatever the model computed in
        loss = objective.loss(outputs, target)
        if loss.shape != points.shape[:1]:
            raise ValueError(
                f"objective {objective.name!r} must return one loss per row {tuple(points.shape[:1])}, "
                f"got {tuple(loss.shape)}"
            )
        # The sum too must be taken with grad enabled: a caller inside torch.no_grad() (a validation hook) would
        # otherwise hand autograd a sum without a graph.
        (grad,) = torch.autograd.grad(loss.sum(), points)
    # One pass for both checks: a row's largest |g| is NaN or inf iff some entry is, and 0 iff all are.
    largest = torch.linalg.vector_norm(grad.flatten(1), ord=float("inf"), dim=1)
    finite_loss = torch.isfinite(loss.detach())
    bad = ~finite_loss | ~torch.isfinite(largest)
    zero = (largest == 0) & ~bad
    grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    success = None
    if with_success and objective.success is not None:
        success = objective.success(outputs.detach(), target) & ~bad
    clean_loss = torch.where(finite_loss, loss.detach(), torch.full_like(loss.detach(), float("-inf")))
    return Evaluation(clean_loss, grad, success, bad, zero)


def score(
    forward: Forward, objective: Objective, points: torch.Tensor, target: Target, config: AttackConfig
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Loss, success (or None) and a non-finite flag at ``points``, forward only."""
    with torch.no_grad():
        with model_precision(config, points.device):
            outputs = forward(points)
        outputs = outputs.to(points.dtype)
        loss = objective.loss(outputs, target)
        bad = ~torch.isfinite(loss)
        success = None if objective.success is None else objective.success(outputs, target) & ~bad
        loss = torch.where(bad, torch.full_like(loss, float("-inf")), loss)
    return loss, success, bad


def per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) broadcastable against ``like``."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def l2_norms(values: torch.Tensor) -> torch.Tensor:
    """Per-row L2 norms, shaped to broadcast against ``values``."""
    return per_row(values.flatten(1).norm(p=2, dim=1), values)


def unit_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent direction of unit norm: sign (Linf) or g/||g||_2 per row (L2); zero stays zero."""
    if norm == "linf":
        return grad.sign()
    return grad / (l2_norms(grad) + _TINY)


class Ball:
    """The eps-ball around ``x`` intersected with [0,1]: ``project(points)`` maps points into it.

    Linf: min(max(p, x - eps), x + eps) clamped to [0,1] is one clamp between bounds computed once per attack
    (x is in [0,1], so the bounds never cross). L2: shrink the perturbation to norm eps per row, then clamp.
    """

    def __init__(self, x: torch.Tensor, norm: str, eps: float) -> None:
        self.x, self.norm, self.eps = x, norm, eps
        if norm == "linf":
            self.low, self.high = (x - eps).clamp(min=0.0), (x + eps).clamp(max=1.0)

    def project(self, points: torch.Tensor) -> torch.Tensor:
        if self.norm == "linf":
            return torch.clamp(points, self.low, self.high)
        delta = points - self.x
        shrink = torch.clamp(self.eps / (l2_norms(delta) + _TINY), max=1.0)
        return (self.x + delta * shrink).clamp(0.0, 1.0)


def random_start(
    x: torch.Tensor,
    config: AttackConfig,
    generator: torch.Generator,
    row_seeds: Sequence[int] | None,
    restart: int,
) -> torch.Tensor:
    """A start point: x + noise in the ball, clamped into [0,1]; x itself when ``random_start`` is off.

    Linf draws U(-eps, eps) per pixel (RobustVLM's PGD and perceptual-metrics' ``use_rs``, behind paper 003's
    numbers); L2 draws eps * g/||g||_2 with g ~ N(0, I) (auto-attack). With ``row_seeds`` each row draws from its
    own generator seeded by (row seed, restart, config seed), so a row gets the same start in any batch; without,
    the whole batch draws from ``generator`` in one call.
    """
    if not config.random_start:
        return x.clone()
    if row_seeds is None:
        noise = _draw(x.shape, config.norm, generator).to(device=x.device, dtype=x.dtype)
    else:
        if len(row_seeds) != x.shape[0]:
            raise ValueError(f"row_seeds has {len(row_seeds)} seeds for a batch of {x.shape[0]} rows")
        rows = []
        for seed in row_seeds:
            row_generator = torch.Generator(device=generator.device)
            row_generator.manual_seed(sample_seed(int(seed), restart, "attack_start", config.seed))
            rows.append(_draw((1, *x.shape[1:]), config.norm, row_generator))
        noise = torch.cat(rows).to(device=x.device, dtype=x.dtype)
    if config.norm == "linf":
        delta = (2 * noise - 1) * config.eps
    else:
        delta = config.eps * noise / (l2_norms(noise) + _TINY)
    return (x + delta).clamp(0.0, 1.0)


def _draw(shape: Sequence[int], norm: str, generator: torch.Generator) -> torch.Tensor:
    # Drawn in fp32 on the generator's device: the same seed gives the same start for fp32 and fp64 inputs.
    if norm == "linf":
        return torch.rand(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)


def attack_generator(x: torch.Tensor, config: AttackConfig, generator: torch.Generator | None) -> torch.Generator:
    """The caller's generator, or a fresh one on x's device seeded with ``config.seed``."""
    if generator is not None:
        return generator
    fresh = torch.Generator(device=x.device)
    fresh.manual_seed(config.seed)
    return fresh
