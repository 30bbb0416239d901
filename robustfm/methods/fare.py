"""FARE (paper 003, eq. 4; RobustVLM ``adversarial_training_clip.py`` with ``--loss l2``): the task.

Per batch: the inner maximizer finds x + delta around each clean image x, in the eps-ball, maximizing the distance of
f(x + delta) to ``target`` = f0(x) (the frozen starting encoder's clean embedding, from the frozen-model data stage);
then the loss is taken there. See :class:`~robustfm.methods.fare_config.FAREConfig` for the losses.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from robustfm.config import ModelConfig
from robustfm.methods.adversarial import AdversarialFTTask, check_clip
from robustfm.methods.fare_config import FAREConfig
from robustfm.models.clip import ClipModel


def squared_distance(embeddings: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the squared L2 distance summed over dimensions (RobustVLM ``l2``), in fp32."""
    return (embeddings.float() - target.float()).pow(2).sum(dim=1).mean()


class FARETask(AdversarialFTTask):
    """The engine's task: ``{"fare", "adversarial", "clean"}`` on ``{"image", "target", "attack_seed"}`` batches."""

    loss_name = "fare"

    def __init__(self, model: ClipModel, config: FAREConfig | None = None) -> None:
        super().__init__(model, config or FAREConfig())

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unweighted losses.

        Args:
            batch: ``image`` ``(N, 3, S, S)`` in [0, 1]; ``target`` ``(N, E)``: f0(image); ``attack_seed`` ``(N,)``.
        """
        images, target = batch["image"], batch["target"]
        if target.ndim != 2 or target.shape[0] != images.shape[0]:
            raise ValueError(f"batch 'target' must be (N, E) embeddings of the N images, got {tuple(target.shape)}")
        if self.loss_name not in self.active_losses:
            return {}
        # Both keys name f0(x): embedding_l2 reads "target", cosine_away "clean".
        points = self.adversarial_points(self.model.encode_image, images, {"target": target, "clean": target}, batch)
        if self.config.clean_weight > 0:  # one forward of both halves: the clean term trains too
            adversarial_embeddings, clean_embeddings = self.model.encode_image(torch.cat([points, images])).chunk(2)
            clean = squared_distance(clean_embeddings, target)
        else:
            adversarial_embeddings = self.model.encode_image(points)
            with torch.no_grad():  # reported only: how far the clean embeddings drift from f0
                clean = squared_distance(self.model.encode_image(images), target)
        return self.mix(squared_distance(adversarial_embeddings, target), clean)


def build_fare_task(model: ModelConfig, settings: FAREConfig) -> FARETask:
    """Build the CLIP model named by ``model`` (random init, a tag or a local path) as a FARE task.

    Building the backbone is the first random draw after the engine seeds torch, so a random-init backbone is the
    same network that the frozen-model stage builds as f0 with the same seed.
    """
    from robustfm.models import create_model

    return FARETask(check_clip(create_model(model.name, pretrained=model.pretrained), model.name, "fare"), settings)
