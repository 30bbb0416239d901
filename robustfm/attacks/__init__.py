"""Adversarial attacks on [0,1] pixels: PGD (RobustVLM's training attack) and APGD (the evaluation attack).

Usage::

    from robustfm.attacks import AttackConfig, apgd, pgd

    config = AttackConfig(norm="linf", eps=4 / 255, steps=100, objective="ce")
    result = apgd(model, images, {"labels": labels}, config)
    robust = ~result.success & ~result.failed            # failed rows: non-finite loss/gradient, report them

    fare = AttackConfig(eps=4 / 255, steps=10, objective="embedding_l2")
    x_adv = pgd(model, images, {"target": frozen_clean_embeddings}, fare, score_last=False).x_adv

Objectives are registered in :data:`OBJECTIVES` (see :mod:`robustfm.attacks.objectives` for the interface).
Importing this package (for the config or the registry) imports no torch; ``pgd``, ``apgd`` and the result type
load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from robustfm.attacks.config import AttackConfig
from robustfm.attacks.registry import OBJECTIVES

if TYPE_CHECKING:
    from robustfm.attacks.apgd_attack import apgd, checkpoint_schedule
    from robustfm.attacks.common import AttackResult
    from robustfm.attacks.objectives import Objective
    from robustfm.attacks.pgd_attack import pgd

__all__ = ["OBJECTIVES", "AttackConfig", "AttackResult", "Objective", "apgd", "checkpoint_schedule", "pgd"]

_LAZY = {
    "apgd": "robustfm.attacks.apgd_attack",
    "checkpoint_schedule": "robustfm.attacks.apgd_attack",
    "AttackResult": "robustfm.attacks.common",
    "Objective": "robustfm.attacks.objectives",
    "pgd": "robustfm.attacks.pgd_attack",
}


def __getattr__(name: str) -> Any:
    # The attacks live beside torch; importing the package for its config or registry must stay light.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'robustfm.attacks' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
