"""AttnLRP's rules (Achtibat et al., ICML 2024) as *routed* autograd Functions.

AttnLRP in its efficient gradient form: relevance at the input is ``input * gradient`` after a backward pass in which
every non-linear operation's backward is replaced by its LRP rule; linear layers keep their plain gradient (the
epsilon rule, the bias absorbing its share). The rules (spec §0.2, lxt 2.1's efficient rules re-derived):

- elementwise activations (GELU, QuickGELU, ReLU, SiLU): identity rule, ``grad_x = grad_y * f(x) / x``;
- LayerNorm: the standard deviation is a constant, so only the centring (linear) and the affine part remain,
  ``grad_x = (gamma * g - mean(gamma * g)) / std(x)``;
- softmax: its plain gradient *is* AttnLRP's softmax rule (``R_i = x_i (R_i - s_i sum_j R_j)``);
- bilinear products ``q k^T`` and ``A v``: uniform rule, each factor gets half the gradient (so ``q`` and ``k`` get a
  quarter, ``v`` a half); or the CP rule: no gradient through ``A``, ``v`` keeps all of it.

**Routing.** A rule replaces a derivative only while the LRP backward pass runs: each Function holds a
:class:`RulePhase` and its backward applies the rule when ``phase.active`` and the true derivative otherwise. Inside
:meth:`RulePhase.routing` the relevance pass differentiates with the rules (``create_graph=True`` records the rule
formulas, computed from the saved inputs with differentiable ops); any later backward, e.g. of a loss on the
relevance map, runs with the phase off, so the forward activations used in those formulas are differentiated with
their *true* Jacobians. The parameter gradient of a loss on the map is therefore the exact derivative of the map
(``tests/unit/test_explain_attnlrp.py`` checks it with ``gradcheck``), and the same forward pass could also serve a
cross-entropy loss. A plain ``.detach()`` or a Function whose backward is always zero (lxt's CP rule) would instead
cut the second-order path to ``W_q``/``W_k`` and the norms (spec §0.2 (c), (d)).

The forward of every Function returns the module's own output unchanged (``_Routed``) or its input (``_RoutedScale``):
inside the rules the model computes exactly what it computes outside.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

# The identity rule's ratio f(x) / x is 0/0 at x = 0: a stabiliser keeps it finite (AttnLRP's epsilon); it only matters
# for |x| near 1e-10, where the input's relevance contribution is negligible anyway.
IDENTITY_RULE_EPS = 1e-10


class RulePhase:
    """Whether the LRP rules route the backward pass right now (one object per relevance computation).

    Kept on each Function's context rather than in a global or thread-local flag: autograd may run a backward on
    another thread (CUDA device threads), and concurrent relevance computations must not see each other's phase.
    """

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active = False

    @contextmanager
    def routing(self) -> Iterator[None]:
        """Apply the rules to every backward pass run inside the context."""
        self.active = True
        try:
            yield
        finally:
            self.active = False


class _Routed(torch.autograd.Function):
    """``y`` unchanged; backward: ``rule(x, grad, *extras)`` to ``x`` while the phase is active, else ``grad`` to
    ``y`` (whose own graph holds the true derivative for ``x`` and the module's parameters)."""

    @staticmethod
    def forward(
        ctx: Any, phase: RulePhase, rule: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor, *extras
    ):
        ctx.phase, ctx.rule = phase, rule
        ctx.save_for_backward(x, *extras)
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, *extras = ctx.saved_tensors
        skip = [None] * len(extras)
        if ctx.phase.active:
            return None, None, ctx.rule(x, grad, *extras), None, *skip
        return None, None, None, grad, *skip


class _RoutedScale(torch.autograd.Function):
    """``x`` unchanged; backward: ``grad * factor`` while the phase is active, else ``grad``."""

    @staticmethod
    def forward(ctx: Any, phase: RulePhase, x: torch.Tensor, factor: float):
        ctx.phase, ctx.factor = phase, factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        if not ctx.phase.active:
            return None, grad, None
        if ctx.factor == 0:
            return None, None, None  # nothing flows on: autograd skips the branch instead of propagating zeros
        return None, grad * ctx.factor, None


def routed(
    phase: RulePhase, rule: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor, *extras: torch.Tensor
) -> torch.Tensor:
    """``y`` (the output of an operation on ``x``), whose backward applies ``rule(x, grad, *extras)`` while ``phase``
    is active. ``extras`` are tensors the rule reads (a norm's weight): passed as inputs so that derivatives of the
    rule's result reach them."""
    return _Routed.apply(phase, rule, x, y, *extras)


def routed_scale(phase: RulePhase, x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x``, whose gradient is multiplied by ``factor`` while ``phase`` is active (uniform / CP rule)."""
    return _RoutedScale.apply(phase, x, float(factor))


def identity_rule(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The identity rule of an elementwise ``fn``: ``grad * fn(x) / x``, the ratio recomputed from the saved input with
    differentiable ops (lxt saves it from the forward as a constant, which loses its second derivative)."""

    def rule(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        # Half precision: the stabiliser underflows in fp16, and the ratio of two rounded numbers is coarse.
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        sign = torch.where(xf >= 0, 1.0, -1.0).to(xf.dtype)
        ratio = fn(xf) / (xf + IDENTITY_RULE_EPS * sign)
        return grad * ratio.to(grad.dtype)

    return rule


def layer_norm_rule(
    normalized_dims: int, eps: float
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """AttnLRP's LayerNorm rule over the last ``normalized_dims`` dims: the standard deviation is a constant, recomputed
    in the backward from the saved input so that a second derivative sees its dependence on earlier layers."""
    dims = tuple(range(-normalized_dims, 0))

    def rule(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        scaled = grad if weight is None else grad * weight
        std = torch.sqrt(x.var(dim=dims, unbiased=False, keepdim=True) + eps)
        return (scaled - scaled.mean(dim=dims, keepdim=True)) / std

    return rule
