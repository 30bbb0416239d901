"""What a task may need from the strategy beyond one plain backward, and which strategies provide it.

A task declares ``needs`` (a set of the names in :data:`CAPABILITIES`); a method declares the same set statically in
its registry entry (``METHODS.register_lazy(..., needs=(...))``), so that :func:`check_capabilities` can refuse a
config before any worker starts. Every entry of :data:`SUPPORT` is a finding of the two-process tests in
:data:`EVIDENCE`, which also check that this table still says what they observe.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from robustfm.config import ConfigError
from robustfm.registry import did_you_mean
from robustfm.train.config import TrainConfig

EVIDENCE = "tests/unit/test_train_equivalence.py"
"""The tests that justify :data:`SUPPORT`: 2 processes (gloo) against 1 process on the whole batch, fp32, SGD."""

CAPABILITIES: dict[str, str] = {
    "double_backward_input": (
        "a loss differentiated through a gradient w.r.t. inputs or activations, taken inside forward with "
        "torch.autograd.grad(..., create_graph=True) (GradMask/RRR input-gradient penalties, relevance maps)"
    ),
    "double_backward_params": (
        "a loss differentiated through a gradient w.r.t. the parameters, taken inside forward with "
        "torch.autograd.grad(..., create_graph=True). The inner gradient is this rank's: autograd.grad returns it "
        "before any gradient hook runs, so no strategy all-reduces it, and the penalty is one of the local batch"
    ),
    "in_task_attack": (
        "an attack inside forward: several forward/backward passes through the model w.r.t. its input only "
        "(torch.autograd.grad(loss, x), the model held in eval mode, parameters' .grad untouched), then the loss at "
        "the points found (FARE and TeCoA adversarial fine-tuning)"
    ),
}
"""Capability name -> what a task that needs it does. Neither may call ``backward(create_graph=True)``: the
engine's single backward of the weighted total is the only one that reaches the strategy's gradient hooks."""


@dataclass(frozen=True)
class Support:
    """Whether a strategy provides a capability, and what the test found."""

    supported: bool
    finding: str
    matches_on_cpu: bool | None = None
    """What the two-process CPU test observes when the table decides otherwise for a reason that test cannot see
    (a strategy that matches on CPU but is refused until a GPU run shows it works); None: the same as
    ``supported``."""

    @property
    def expected_on_cpu(self) -> bool:
        """Whether the two-process CPU test must find the strategy equal to one process."""
        return self.supported if self.matches_on_cpu is None else self.matches_on_cpu


_MATCHES = "parameters and losses after 8 steps (and after 4 with grad_accum_steps=2) equal one process's"
_ZERO3_FAILS = (
    "the backward fails ('mat2 must be a matrix'): ZeRO-3 frees each parameter after its module's forward and "
    "gathers it again only for the first-order backward, so the second-order nodes read the freed, empty tensors"
)

_ZERO3_ATTACK_UNVERIFIED = (
    "refused until a GPU run shows it works: on CPU (2 processes, gloo) parameters and losses match one process's, "
    "but ZeRO-3 re-gathers every partitioned parameter in each of the attack's backward passes, and its CUDA "
    "prefetching and release of parameters around autograd.grad calls inside forward are not exercised on CPU"
)

SUPPORT: dict[tuple[str, str], Support] = {
    ("double_backward_input", "ddp"): Support(True, _MATCHES),
    ("double_backward_input", "zero0"): Support(True, _MATCHES),
    ("double_backward_input", "zero1"): Support(True, _MATCHES),
    ("double_backward_input", "zero2"): Support(True, _MATCHES),
    ("double_backward_input", "zero3"): Support(False, _ZERO3_FAILS),
    ("double_backward_params", "ddp"): Support(True, _MATCHES),
    ("double_backward_params", "zero0"): Support(True, _MATCHES),
    ("double_backward_params", "zero1"): Support(True, _MATCHES),
    ("double_backward_params", "zero2"): Support(True, _MATCHES),
    ("double_backward_params", "zero3"): Support(False, _ZERO3_FAILS),
    ("in_task_attack", "ddp"): Support(True, _MATCHES),
    ("in_task_attack", "zero0"): Support(True, _MATCHES),
    ("in_task_attack", "zero1"): Support(True, _MATCHES),
    ("in_task_attack", "zero2"): Support(True, _MATCHES),
    ("in_task_attack", "zero3"): Support(False, _ZERO3_ATTACK_UNVERIFIED, matches_on_cpu=True),
}
"""(capability, :func:`strategy_key`) -> support. Complete: every capability has an entry for every strategy."""

STRATEGY_KEYS = ("ddp", "zero0", "zero1", "zero2", "zero3")
AUTO_CHOICES: tuple[tuple[str, int], ...] = (("ddp", 0), ("deepspeed", 2), ("deepspeed", 3))
"""What ``auto`` may choose, from the fastest to the one that holds the most."""


def strategy_key(name: str, zero_stage: int) -> str:
    """``ddp`` or ``zero<stage>`` for a concrete strategy (``name`` is ``ddp`` or ``deepspeed``, never ``auto``)."""
    if name == "ddp":
        return "ddp"
    if name == "deepspeed":
        return f"zero{zero_stage}"
    raise ValueError(f"strategy {name!r} is not a concrete strategy (ddp or deepspeed)")


def strategy_label(name: str, zero_stage: int) -> str:
    """``ddp`` or ``deepspeed ZeRO-<stage>``, for messages."""
    return "ddp" if name == "ddp" else f"deepspeed ZeRO-{zero_stage}"


def check_needs(needs: Collection[str]) -> frozenset[str]:
    """``needs`` as a frozenset; raises ValueError on a name that is not in :data:`CAPABILITIES`."""
    for name in needs:
        if name not in CAPABILITIES:
            raise ValueError(
                f"unknown capability {name!r}{did_you_mean(name, list(CAPABILITIES))} "
                f"(known: {', '.join(CAPABILITIES)})"
            )
    return frozenset(needs)


def unsupported(needs: Collection[str], name: str, zero_stage: int) -> dict[str, Support]:
    """The capabilities of ``needs`` that the strategy does not provide, with the finding that says why."""
    key = strategy_key(name, zero_stage)
    found = {need: SUPPORT[(need, key)] for need in sorted(check_needs(needs))}
    return {need: support for need, support in found.items() if not support.supported}


def supported_strategies(needs: Collection[str]) -> list[str]:
    """Labels of the concrete strategies that provide every capability of ``needs``."""
    keys = [k for k in STRATEGY_KEYS if all(SUPPORT[(n, k)].supported for n in check_needs(needs))]
    return ["ddp" if k == "ddp" else f"deepspeed ZeRO-{k.removeprefix('zero')}" for k in keys]


def check_capabilities(train_cfg: TrainConfig, needs: Collection[str], prefix: str = "") -> None:
    """Raise :class:`ConfigError` on the strategy field when the configured strategy cannot train a task that needs
    ``needs``. ``auto`` passes when one of its choices (DDP, ZeRO-2, ZeRO-3) can: it then picks only among those.

    Call it where configs are checked (a recipe, with its method's registry ``needs``); :func:`robustfm.train.fit`
    calls it again with the task's own ``needs`` before launching.

    Args:
        train_cfg: the engine config.
        needs: capability names (see :data:`CAPABILITIES`); an unknown name raises ValueError.
        prefix: dotted path of ``train_cfg`` inside a larger config (``train``), prepended to the field.
    """
    needs = check_needs(needs)
    strategy = train_cfg.strategy
    if not needs:
        return
    if strategy.name == "auto":
        if not any(not unsupported(needs, name, stage) for name, stage in AUTO_CHOICES):
            raise ConfigError(
                "strategy.name",
                f"auto chooses among ddp, deepspeed ZeRO-2 and ZeRO-3, and none supports {sorted(needs)} "
                f"(supported: {', '.join(supported_strategies(needs)) or 'none'}; see {EVIDENCE})",
            ).under(prefix)
        return
    missing = unsupported(needs, strategy.name, strategy.zero_stage)
    if not missing:
        return
    label = strategy_label(strategy.name, strategy.zero_stage)
    findings = list(dict.fromkeys(support.finding for support in missing.values()))  # one each, in order
    field = "strategy.zero_stage" if strategy.name == "deepspeed" else "strategy.name"
    raise ConfigError(
        field,
        f"{label} does not support {', '.join(missing)}: {'; '.join(findings)} (found by {EVIDENCE}). "
        f"Strategies that do: {', '.join(supported_strategies(needs)) or 'none'}",
    ).under(prefix)
