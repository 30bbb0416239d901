"""CFT's baselines (paper 001 §4.1): GradMask, RRR and RRDA as tasks of a timm classifier.

GradMask and RRR penalise the input gradient outside the concept mask S (``mask == 0``). The gradient is taken with
``create_graph=True`` inside forward, so the penalty has a parameter gradient: RobustViT's scripts omit it (spec fact
8), so their regularisers never train and those baselines are CE-only. Both share the forward pass between the penalty
and the cross-entropy (the logits of the pixels the gradient is taken at). RRDA is a plain cross-entropy on the batch's
images, which a data stage has composited (foreground pasted onto another image's context).

Gradients are taken with respect to the [0, 1] pixels (RobustViT's are w.r.t. the normalised input: a factor 1/std
per channel, which only rescales the penalty).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from robustfm.config import ConfigError, ModelConfig
from robustfm.methods.cft import at_least_float32, classifier_param_groups
from robustfm.methods.cft_baselines_config import (
    INPUT_GRADIENT_LOSSES,
    RRDA_LOSSES,
    GradMaskConfig,
    RRDAConfig,
    RRRConfig,
)
from robustfm.models.timm_classifier import TimmClassifier
from robustfm.train.task import StageSpec, refuse_stage_settings

Forward = Callable[[torch.Tensor], torch.Tensor]


def gradmask_penalty(
    forward: Forward, images: torch.Tensor, labels: torch.Tensor, background: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean((dy_c/dx * background)^2), logits)``: y_c the ground-truth logit, the mean over every pixel and channel
    of the batch (Simpson et al. 2019; RobustViT's MSE against zero).

    Args:
        forward: [0, 1] pixels -> logits.
        images: ``(N, 3, S, S)`` in [0, 1].
        labels: ``(N,)`` class indices.
        background: ``(N, 1, S, S)`` float, 1 outside the concept mask.
    """
    x = images.detach().requires_grad_(True)
    logits = forward(x)
    score = logits.gather(1, labels.long()[:, None]).sum()
    (grad,) = torch.autograd.grad(score, x, create_graph=True)
    return (grad * background).pow(2).mean(), logits


def rrr_penalty(forward: Forward, images: torch.Tensor, background: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean_n sum_{c,h,w} (d/dx sum_k log softmax_k * background)^2, logits)`` (Ross et al. 2017 with A = 1 on the
    forbidden, non-concept pixels): the per-sample sum of RobustViT's batch sum, so that DDP ranks average exactly.

    Args: as :func:`gradmask_penalty`.
    """
    x = images.detach().requires_grad_(True)
    logits = forward(x)
    score = F.log_softmax(at_least_float32(logits), dim=-1).sum()
    (grad,) = torch.autograd.grad(score, x, create_graph=True)
    return (grad * background).pow(2).flatten(1).sum(dim=1).mean(), logits


@contextmanager
def second_order_attention(model: nn.Module) -> Iterator[None]:
    """Explicit attention for a ViT classifier (its fused kernel has no double backward, pytorch#116350); nothing for
    a CNN or any other module."""
    if isinstance(model, TimmClassifier) and model.has_tokens:
        from robustfm.models.attention import attention_taps

        with attention_taps(model, record=False):
            yield
        return
    yield


class ClassifierTask(nn.Module):
    """What the baselines share: a timm classifier, groups ``backbone``/``head``, a fixed set of loss names.

    Args:
        model: the classifier being fine-tuned.
        losses: the loss names the task can return.
        method: the method's name, for messages.
    """

    def __init__(self, model: TimmClassifier, losses: tuple[str, ...], method: str) -> None:
        super().__init__()
        self.model = model
        self.losses = losses
        self.method = method
        self.active_losses: frozenset[str] = frozenset(losses)

    @property
    def needs(self) -> frozenset[str]:
        """``double_backward_input`` while the input-gradient penalty is active."""
        return frozenset({"double_backward_input"}) if "input_gradient" in self.active_losses else frozenset()

    def configure_stage(self, stage: StageSpec) -> None:
        """Check the stage's loss weights; these methods have no per-stage settings."""
        unknown = sorted(stage.active_losses - set(self.losses))
        if unknown:
            raise ConfigError(f"stages.{stage.name}.loss_weights", f"{unknown} are not losses of {list(self.losses)}")
        refuse_stage_settings(stage, self.method)
        self.active_losses = stage.active_losses

    def after_optimizer_step(self) -> None:
        """Nothing to do after a step."""

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """``head`` (the classifier layer) and ``backbone`` (everything else)."""
        return classifier_param_groups(self.model)


class InputGradientTask(ClassifierTask):
    """GradMask or RRR: ``{"input_gradient", "cls"}`` on ``{"image", "label", "mask"}`` batches.

    Args:
        model: the classifier being fine-tuned.
        penalty: ``gradmask`` or ``rrr``.
    """

    def __init__(self, model: TimmClassifier, penalty: str) -> None:
        if penalty not in ("gradmask", "rrr"):
            raise ValueError(f"penalty must be 'gradmask' or 'rrr', got {penalty!r}")
        super().__init__(model, INPUT_GRADIENT_LOSSES, penalty)
        self.penalty = penalty

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unweighted losses for the active names.

        Args:
            batch: ``image`` ``(N, 3, S, S)`` in [0, 1]; ``label`` ``(N,)``; ``mask`` ``(N, 1, S, S)`` uint8,
                concept where > 0 (needed by ``input_gradient``).
        """
        images, labels = batch["image"], batch["label"].long()
        losses: dict[str, torch.Tensor] = {}
        if "input_gradient" in self.active_losses:
            if "mask" not in batch:
                raise KeyError(f"batch has no 'mask' column: {self.method}'s penalty needs the concept masks")
            mask = batch["mask"]
            background = (mask == 0).to(images.dtype).reshape(images.shape[0], 1, *images.shape[-2:])
            with second_order_attention(self.model):
                if self.penalty == "gradmask":
                    penalty, logits = gradmask_penalty(self.model, images, labels, background)
                else:
                    penalty, logits = rrr_penalty(self.model, images, background)
            losses["input_gradient"] = penalty
        else:
            logits = self.model(images)
        if "cls" in self.active_losses:
            losses["cls"] = F.cross_entropy(at_least_float32(logits), labels.to(logits.device))
        return losses


class RRDATask(ClassifierTask):
    """RRDA: ``{"cls"}``, the ground-truth cross-entropy on ``{"image", "label"}`` batches whose images a data stage
    composited."""

    def __init__(self, model: TimmClassifier) -> None:
        super().__init__(model, RRDA_LOSSES, "rrda")

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unweighted cross-entropy (empty when ``cls`` is not active)."""
        if "cls" not in self.active_losses:
            return {}
        logits = self.model(batch["image"])
        return {"cls": F.cross_entropy(at_least_float32(logits), batch["label"].long().to(logits.device))}


def _classifier(model: ModelConfig, method: str) -> TimmClassifier:
    from robustfm.models import create_model

    classifier = create_model(model.name, pretrained=model.pretrained)
    if not isinstance(classifier, TimmClassifier):
        raise ConfigError("model.name", f"{method} fine-tunes a timm classifier (timm/...); {model.name} is not one")
    return classifier


def build_gradmask_task(model: ModelConfig, settings: GradMaskConfig) -> InputGradientTask:
    """GradMask on the timm classifier named by ``model`` (the weights live in the stage's ``loss_weights``)."""
    return InputGradientTask(_classifier(model, "gradmask"), "gradmask")


def build_rrr_task(model: ModelConfig, settings: RRRConfig) -> InputGradientTask:
    """RRR on the timm classifier named by ``model`` (the weights live in the stage's ``loss_weights``)."""
    return InputGradientTask(_classifier(model, "rrr"), "rrr")


def build_rrda_task(model: ModelConfig, settings: RRDAConfig) -> RRDATask:
    """RRDA on the timm classifier named by ``model``."""
    return RRDATask(_classifier(model, "rrda"))
