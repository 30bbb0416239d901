"""The ``method`` section of paper 004's robustness fine-tuning, and its registration in ``METHODS``.

Importing this module imports neither torch nor open_clip.
"""

from __future__ import annotations

from dataclasses import dataclass

from robustfm.methods import METHODS

PERTURB_FT_LOSSES = ("perturbed", "clean")


@dataclass(frozen=True)
class PerturbFTConfig:
    """How embeddings are compared with the frozen starting encoder's (paper 004, "fine-tuning to improve robustness
    without sacrificing utility"; the paper publishes no objective: this is the FARE-like one of METHODS.md)."""

    normalize_embeddings: bool = False
    """False: squared L2 between raw embeddings (FARE's choice: it also keeps the embedding norm, which downstream
    heads may use). True: between unit-length embeddings (only directions, i.e. cosine, are kept)."""


METHODS.register_lazy(
    "perturb_ft",
    "robustfm.methods.perturb_ft:build_perturb_ft_task",
    losses=PERTURB_FT_LOSSES,
    param_groups=("image_encoder", "text_encoder"),
    needs=(),
    config=PerturbFTConfig,
    description="paper 004: keep f(perturb(x)) close to the frozen starting encoder's f0(x) (+ a clean term)",
)
