"""The attack objective registry. Lazy entries: listing names or validating a config imports no torch.

Meta of each entry:
- ``needs``: the keys the objective reads from the ``target`` mapping (each a tensor whose first dim is the batch);
- ``has_success``: whether the objective defines per-row success (``AttackConfig.early_stop`` needs one);
- ``outputs``: what ``forward(x)`` must return for it;
- ``description``: the loss that is maximized.

A custom objective registers an :class:`~robustfm.attacks.objectives.Objective` with the same meta::

    OBJECTIVES.register("margin", Objective("margin", margin_loss, needs=("labels",)), needs=("labels",),
                        has_success=False, outputs="logits (B, C)", description="...")
"""

from __future__ import annotations

from robustfm.registry import Registry

OBJECTIVES: Registry = Registry("attack objective")

OBJECTIVES.register_lazy(
    "ce",
    "robustfm.attacks.objectives:CE",
    needs=("labels",),
    has_success=True,
    outputs="logits (B, C)",
    description="cross-entropy of the logits against labels; success: argmax != label",
)
OBJECTIVES.register_lazy(
    "dlr_targeted",
    "robustfm.attacks.objectives:DLR_TARGETED",
    needs=("labels", "target_labels"),
    has_success=True,
    outputs="logits (B, C), C >= 4",
    description="APGD-T's targeted DLR loss -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) towards target_labels; "
    "success: argmax != label (any wrong class counts, as in auto-attack)",
)
OBJECTIVES.register_lazy(
    "embedding_l2",
    "robustfm.attacks.objectives:EMBEDDING_L2",
    needs=("target",),
    has_success=False,
    outputs="embeddings (B, D), unnormalized",
    description="FARE: squared L2 distance summed over dims between the embedding and target (B, D), unnormalized",
)
OBJECTIVES.register_lazy(
    "two_afc",
    "robustfm.attacks.objectives:TWO_AFC",
    needs=("left", "right", "labels"),
    has_success=True,
    outputs="reference embeddings (B, D)",
    description="2AFC: CE of the unscaled logits [cos(ref, left), cos(ref, right)] against labels (1 = right); "
    "success: the decision (right iff cos_right > cos_left, tie -> left) differs from the label",
)
OBJECTIVES.register_lazy(
    "cosine_away",
    "robustfm.attacks.objectives:COSINE_AWAY",
    needs=("clean",),
    has_success=False,
    outputs="embeddings (B, D)",
    description="paper 003 eq. 6: ||n(f(x+d)) - n(clean)||^2 = 2 - 2 cos (untargeted; clean (B, D) = f(x))",
)
OBJECTIVES.register_lazy(
    "targeted_set",
    "robustfm.attacks.objectives:TARGETED_SET",
    needs=("targets",),
    has_success=False,
    outputs="embeddings (B, D)",
    description="paper 003 eq. 5: -sum over the set of ||n(f(x+d)) - n(t_k)||^2, targets (B, K, D)",
)
OBJECTIVES.register_lazy(
    "inversion",
    "robustfm.attacks.objectives:INVERSION",
    needs=("target",),
    has_success=False,
    outputs="embeddings (B, D)",
    description="paper 003 eq. 9 feature inversion: -||n(f(z+d)) - n(target)||^2, target (B, D)",
)
