"""TeCoA (RobustVLM ``adversarial_training_clip.py`` with ``--loss ce``): the task.

The classifier is the frozen text tower's embedding of one prompt per class, computed once per stage on the task's
device (the text tower never trains: :meth:`TeCoATask.configure_stage` drops the cache, and loading weights does too).
See :class:`~robustfm.methods.tecoa_config.TeCoAConfig` for the losses.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from robustfm.config import ConfigError, ModelConfig
from robustfm.methods.adversarial import AdversarialFTTask, check_clip
from robustfm.methods.tecoa_config import TeCoAConfig
from robustfm.models.clip import ClipModel
from robustfm.train.task import StageSpec


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over the rows with a label (>= 0); 0 when no row has one (no host sync)."""
    total = F.cross_entropy(logits.float(), labels, ignore_index=-1, reduction="sum")
    return total / (labels >= 0).sum().clamp(min=1)


class TeCoATask(AdversarialFTTask):
    """The engine's task: ``{"tecoa", "adversarial", "clean"}`` on ``{"image", "label", "attack_seed"}`` batches."""

    loss_name = "tecoa"

    def __init__(self, model: ClipModel, config: TeCoAConfig) -> None:
        if not config.class_names:
            raise ConfigError(
                "method.class_names",
                "TeCoA needs the class names in label order (the recipe reads them from the shards' manifest or "
                "method.class_names_file)",
            )
        super().__init__(model, config)
        self._classifier: torch.Tensor | None = None
        self.register_load_state_dict_post_hook(lambda module, _keys: module.drop_classifier())

    def drop_classifier(self) -> None:
        """Forget the cached text embeddings (recomputed from the text tower on the next forward)."""
        self._classifier = None

    def configure_stage(self, stage: StageSpec) -> None:
        super().configure_stage(stage)
        self.drop_classifier()  # a stage's settings may change the template

    def classifier(self) -> torch.Tensor:
        """``(C, E)`` normalized fp32 text embeddings of ``template`` for each class, on the model's device."""
        if self._classifier is None:
            prompts = [self.config.template.format(name) for name in self.config.class_names]
            with torch.no_grad():
                self._classifier = self.model.encode_text(prompts, normalize=True).float().detach()
        return self._classifier

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """``scale * n(f(pixels)) @ T^T`` (fp32): the zero-shot logits of [0,1] pixels."""
        embeddings = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        return self.config.logit_scale * embeddings @ self.classifier().T

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unweighted losses.

        Args:
            batch: ``image`` ``(N, 3, S, S)`` in [0, 1]; ``label`` ``(N,)`` class indices (-1: none);
                ``attack_seed`` ``(N,)``.
        """
        images, labels = batch["image"], batch["label"].long()
        if labels.shape != images.shape[:1]:
            raise ValueError(f"batch 'label' must be (N,) for the N images, got {tuple(labels.shape)}")
        if self.loss_name not in self.active_losses:
            return {}
        # Unlabelled rows are attacked as class 0 and then left out of the loss: every row keeps its place.
        points = self.adversarial_points(self.logits, images, {"labels": labels.clamp(min=0)}, batch)
        if self.config.clean_weight > 0:
            adversarial_logits, clean_logits = self.logits(torch.cat([points, images])).chunk(2)
            clean = labelled_cross_entropy(clean_logits, labels)
        else:
            adversarial_logits = self.logits(points)
            with torch.no_grad():
                clean = labelled_cross_entropy(self.logits(images), labels)
        return self.mix(labelled_cross_entropy(adversarial_logits, labels), clean)


def build_tecoa_task(model: ModelConfig, settings: TeCoAConfig) -> TeCoATask:
    """Build the CLIP model named by ``model`` as a TeCoA task (``settings.class_names`` must be set)."""
    from robustfm.models import create_model

    return TeCoATask(check_clip(create_model(model.name, pretrained=model.pretrained), model.name, "tecoa"), settings)
