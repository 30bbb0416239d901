"""The ``method`` section of TeCoA (paper 003's supervised baseline, Mao et al. 2023; RobustVLM ``--loss ce``), and
its registration in ``METHODS``. Importing this module imports neither torch nor open_clip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from robustfm.attacks import AttackConfig
from robustfm.config import check
from robustfm.methods import METHODS
from robustfm.methods.adversarial_config import ROBUSTVLM_EPS, AdversarialFTConfig

TECOA_LOSSES = ("tecoa",)
TECOA_REPORTS = ("adversarial", "clean")
ROBUSTVLM_TEMPLATE = "This is a photo of a {}"
"""RobustVLM's prompt (``std``; its ``blurry`` variant reads "This is a blurry photo of a {}")."""


@dataclass(frozen=True)
class TeCoAConfig(AdversarialFTConfig):
    """TeCoA: zero-shot cross-entropy of adversarial images against the class prompts' text embeddings::

        adversarial = CE(scale * n(f(x + delta)) @ T^T, y)       clean = CE(scale * n(f(x)) @ T^T, y)

    with T the normalized embeddings of ``template`` per class from the model's frozen text tower (n: L2
    normalization), ``scale`` fixed at 100 (RobustVLM; not the model's temperature), and delta maximizing the same CE
    in the eps-ball. Images without a label (-1) are left out of both terms."""

    objectives: ClassVar[tuple[str, ...]] = ("ce",)

    attack: AttackConfig = field(
        default_factory=lambda: AttackConfig(eps=ROBUSTVLM_EPS, steps=10, step_size=1 / 255, objective="ce")
    )
    """The inner attack: RobustVLM's Linf 4/255, 10 steps of 1/255, maximizing the zero-shot CE."""
    class_names: tuple[str, ...] | None = None
    """Class names in label order. None: the recipe reads them from ``class_names_file`` or, without one, from the
    shards' manifest (``classes``). Duplicates are an error (ImageNet's WordNet names have two "crane"s: use CLIP's
    curated names in a file)."""
    class_names_file: str | None = None
    """A text file with one class name per line, in label order (e.g. CLIP's 1,000 curated ImageNet names)."""
    template: str = ROBUSTVLM_TEMPLATE
    """The prompt of each class, with one ``{}`` for its name."""
    logit_scale: float = 100.0
    """The fixed scale of the cosine logits (RobustVLM: 100)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.template.count("{}") == 1, "template", self.template, "must hold exactly one '{}'")
        check(self.logit_scale > 0, "logit_scale", self.logit_scale, "must be > 0")
        if self.class_names is not None:
            check_class_names(self.class_names, "class_names")


def check_class_names(names: tuple[str, ...] | list[str], field_name: str) -> None:
    """ConfigError on ``field_name`` unless ``names`` is a non-empty list of distinct, non-empty names."""
    check(len(names) > 0, field_name, names, "must name at least one class")
    check(all(isinstance(n, str) and n.strip() for n in names), field_name, names, "must be non-empty strings")
    seen: dict[str, int] = {}
    duplicates = sorted({n for i, n in enumerate(names) if seen.setdefault(n, i) != i})
    check(
        not duplicates,
        field_name,
        duplicates[:5],
        "holds duplicate class names: two classes would get the same prompt (give distinct names, e.g. CLIP's curated "
        "ImageNet names, in method.class_names_file)",
    )


METHODS.register_lazy(
    "tecoa",
    "robustfm.methods.tecoa:build_tecoa_task",
    losses=TECOA_LOSSES,
    reports=TECOA_REPORTS,
    param_groups=("image_encoder", "text_encoder"),
    needs=("in_task_attack",),
    config=TeCoAConfig,
    description="paper 003's TeCoA baseline: zero-shot CE of adversarial images against frozen class prompts",
)
