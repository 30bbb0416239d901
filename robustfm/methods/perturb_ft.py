"""Robustness fine-tuning to everyday perturbations (paper 004): the task.

A CLIP image encoder ``f`` is trained so that the embedding of an everyday-edited image stays where the frozen
starting encoder ``f0`` puts the clean image, while a clean term keeps ``f`` close to ``f0`` on unedited images:

    perturbed = mean_i ||f(P(x_i)) - f0(x_i)||^2        clean = mean_i ||f(x_i) - f0(x_i)||^2

(squared L2 summed over embedding dimensions, averaged over the batch; the engine weights them with the stage's
``loss_weights``, the clean weight being the lambda a sweep tunes). ``f0(x)`` is not computed here: it arrives in the
batch as ``target``, from a frozen-model Ray Data stage that holds ``f0`` (so only ``f`` is wrapped by DDP/DeepSpeed),
and ``P`` (one perturbation and value per image and epoch) is applied by another data stage.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from robustfm.config import ConfigError, ModelConfig
from robustfm.methods.perturb_ft_config import PERTURB_FT_LOSSES, PerturbFTConfig
from robustfm.models.clip import ClipModel
from robustfm.train.task import StageSpec, stage_settings_applied


class PerturbFTTask(nn.Module):
    """The engine's task: ``{"perturbed", "clean"}`` losses on ``{"image", "perturbed", "target"}`` batches.

    Args:
        model: the CLIP model being fine-tuned (its image tower trains; its text tower is a frozen group).
        config: the method section.
    """

    needs: frozenset[str] = frozenset()

    def __init__(self, model: ClipModel, config: PerturbFTConfig | None = None) -> None:
        super().__init__()
        self.model = model
        self.base_config = config or PerturbFTConfig()
        self.config = self.base_config
        self.active_losses: frozenset[str] = frozenset(PERTURB_FT_LOSSES)

    def configure_stage(self, stage: StageSpec) -> None:
        """Note the stage's active losses and apply its settings (e.g. ``normalize_embeddings``)."""
        unknown = sorted(stage.active_losses - set(PERTURB_FT_LOSSES))
        if unknown:
            raise ConfigError(f"stages.{stage.name}.loss_weights", f"{unknown} are not losses of {PERTURB_FT_LOSSES}")
        self.config = stage_settings_applied(self.base_config, stage)
        self.active_losses = stage.active_losses

    def after_optimizer_step(self) -> None:
        """Nothing to do after a step (the temperature is not used by these losses)."""

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """``image_encoder`` (what paper 004 fine-tunes) and ``text_encoder`` (with the temperature)."""
        return {"image_encoder": self.model.image_parameters(), "text_encoder": self.model.text_parameters()}

    def _distance(self, pixels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        embeddings = self.model.encode_image(pixels, normalize=self.config.normalize_embeddings)
        if self.config.normalize_embeddings:
            target = nn.functional.normalize(target, dim=-1)
        return (embeddings.float() - target.float()).pow(2).sum(dim=1).mean()

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unweighted losses for the active names.

        Args:
            batch: ``image`` and ``perturbed`` ``(N, 3, H, W)`` in [0, 1]; ``target`` ``(N, E)``: ``f0(image)``.
        """
        target = batch["target"]
        if target.ndim != 2 or target.shape[0] != batch["image"].shape[0]:
            raise ValueError(f"batch 'target' must be (N, E) embeddings of the N images, got {tuple(target.shape)}")
        losses: dict[str, torch.Tensor] = {}
        if "perturbed" in self.active_losses:
            losses["perturbed"] = self._distance(batch["perturbed"], target)
        if "clean" in self.active_losses:
            losses["clean"] = self._distance(batch["image"], target)
        return losses


def build_perturb_ft_task(model: ModelConfig, settings: PerturbFTConfig) -> PerturbFTTask:
    """Build the CLIP model named by ``model`` (random init, a tag or a local path) as a paper-004 task.

    Building the backbone is the first random draw after the engine seeds torch, so a random-init backbone is the
    same network that :class:`robustfm.data.frozen_stage.EmbeddingLoader` builds as ``f0`` with the same seed.
    """
    from robustfm.models import create_model

    clip = create_model(model.name, pretrained=model.pretrained)
    if not isinstance(clip, ClipModel):
        raise ConfigError("model.name", f"perturb_ft fine-tunes a CLIP image encoder; {model.name} is not open_clip")
    return PerturbFTTask(clip, settings)
