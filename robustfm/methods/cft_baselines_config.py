"""The ``method`` sections of CFT's baselines (paper 001 §4.1, Table 8) and their registration in ``METHODS``.

- ``gradmask`` (Simpson et al. 2019): lambda_non * mean((dy_c/dx * (1 - S))^2) + lambda_cls * CE(f(x), y);
- ``rrr`` (Ross et al. 2017, "right for the right reasons"): lambda_non * sum((d/dx sum log softmax) * (1 - S))^2 +
  lambda_cls * CE(f(x), y);
- ``rrda`` (Santos & Zanchettin 2023): CE on images whose foreground a data stage pasted onto other images' context.

Paper §2 and §4.1 swap the one-line descriptions of GradMask and RRR; these follow the original papers. Unlike
RobustViT's scripts (spec fact 8), the input gradient is taken with ``create_graph=True``, so the penalty trains.
Importing this module imports neither torch nor timm.
"""

from __future__ import annotations

from dataclasses import dataclass

from robustfm.methods import METHODS
from robustfm.methods.cft_config import check_weights

INPUT_GRADIENT_LOSSES = ("input_gradient", "cls")
"""The penalty on the background input gradient and the ground-truth cross-entropy, unweighted."""
RRDA_LOSSES = ("cls",)


@dataclass(frozen=True)
class GradMaskConfig:
    """GradMask's weights (paper 001 Table 8, every model; RobustViT ``imagenet_finetune_gradmask.py``).

    The penalty is the mean over every pixel and channel of the squared gradient of the ground-truth logit with respect
    to the [0, 1] pixels, outside the concept mask."""

    lambda_cls: float = 0.1
    """Weight of CE(f(x), y)."""
    lambda_non: float = 50.0
    """Weight of the background input-gradient penalty."""

    def __post_init__(self) -> None:
        check_weights(self, ("lambda_cls", "lambda_non"))

    def loss_weights(self) -> dict[str, float]:
        """The engine's ``loss_weights``: ``{input_gradient: lambda_non, cls: lambda_cls}``."""
        return {"input_gradient": self.lambda_non, "cls": self.lambda_cls}


@dataclass(frozen=True)
class RRRConfig:
    """RRR's weights (paper 001 Table 8, ViT-B column; DINOv2 uses lambda_cls 2e-8, ConvNeXt-V2 lambda_non 1e-8).

    The penalty is, per sample, the sum over pixels and channels of the squared gradient of sum_k log softmax_k with
    respect to the [0, 1] pixels outside the concept mask, then the mean over the batch (so that DDP ranks average
    exactly). RobustViT sums over the batch too: its penalty is ``batch size`` times this one, so its Table 8 weight
    corresponds to ``lambda_non * batch size`` here (8e-10 at the paper's batch of 8). Under AdamW only the ratio of the
    two weights and the optimizer's eps matter (spec fact 9)."""

    lambda_cls: float = 2e-6
    """Weight of CE(f(x), y) (Table 8's lambda_cls column: our reading of the table, spec §1.2)."""
    lambda_non: float = 1e-10
    """Weight of the background input-gradient penalty."""

    def __post_init__(self) -> None:
        check_weights(self, ("lambda_cls", "lambda_non"))

    def loss_weights(self) -> dict[str, float]:
        """The engine's ``loss_weights``: ``{input_gradient: lambda_non, cls: lambda_cls}``."""
        return {"input_gradient": self.lambda_non, "cls": self.lambda_cls}


@dataclass(frozen=True)
class RRDAConfig:
    """RRDA: plain cross-entropy with the ground truth; the augmentation (foregrounds pasted onto other images'
    context) is a data stage, so the task has no setting of its own."""

    def loss_weights(self) -> dict[str, float]:
        """The engine's ``loss_weights``: ``{cls: 1}``."""
        return {"cls": 1.0}


METHODS.register_lazy(
    "gradmask",
    "robustfm.methods.cft_baselines:build_gradmask_task",
    losses=INPUT_GRADIENT_LOSSES,
    param_groups=("backbone", "head"),
    needs=("double_backward_input",),  # the penalty is a gradient w.r.t. the input, taken with create_graph=True
    config=GradMaskConfig,
    description="CFT baseline (Simpson et al. 2019): penalise the ground-truth logit's input gradient outside the mask",
)
METHODS.register_lazy(
    "rrr",
    "robustfm.methods.cft_baselines:build_rrr_task",
    losses=INPUT_GRADIENT_LOSSES,
    param_groups=("backbone", "head"),
    needs=("double_backward_input",),
    config=RRRConfig,
    description="CFT baseline (Ross et al. 2017): penalise the input gradient of sum log softmax outside the mask",
)
METHODS.register_lazy(
    "rrda",
    "robustfm.methods.cft_baselines:build_rrda_task",
    losses=RRDA_LOSSES,
    param_groups=("backbone", "head"),
    needs=(),
    config=RRDAConfig,
    description="CFT baseline (Santos & Zanchettin 2023): CE on foregrounds a data stage pasted onto other context",
)
