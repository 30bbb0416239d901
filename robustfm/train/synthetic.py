"""Tiny tasks and an in-memory batch source, for tests, benchmarks and checking the engine on a new machine.

:class:`TinyGradientPenaltyTask` adds losses taken through a gradient (double backward) and :class:`TinyAttackTask` a
loss at points an attack found inside ``forward`` (adversarial training): with them the capability table of
:mod:`robustfm.train.capabilities` can be checked on a new strategy, device or library version.

The source fixes the GLOBAL batch: each global batch is split evenly over the ranks, so one process and N processes
see the same samples per optimizer step, and mean-reduced gradients must agree.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustfm.config import ConfigError
from robustfm.seeding import epoch_seed
from robustfm.train.task import StageSpec, refuse_stage_settings


class TinyRegressionTask(nn.Module):
    """An MLP regressor with two parameter groups (``body``, ``head``) and two losses (``mse``, ``l1``).

    Args:
        in_dim: input features. hidden: width of the body. out_dim: targets.
        gradient_multiplier: scales the gradients (not the values) of the losses. 1 is correct; setting it to the
            world size turns the strategy's gradient MEAN into a SUM: the negative control of the equivalence tests.
    """

    loss_names: tuple[str, ...] = ("mse", "l1")
    needs: frozenset[str] = frozenset()

    def __init__(self, in_dim: int = 16, hidden: int = 32, out_dim: int = 4, gradient_multiplier: float = 1.0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, out_dim)
        self.gradient_multiplier = gradient_multiplier
        self.active_losses: frozenset[str] = frozenset(self.loss_names)

    def configure_stage(self, stage: StageSpec) -> None:
        """Compute only the stage's active losses; this task has no settings."""
        refuse_stage_settings(stage, type(self).__name__)
        unknown = sorted(stage.active_losses - set(self.loss_names))
        if unknown:
            raise ConfigError(f"stages.{stage.name}.loss_weights", f"{unknown} are not losses of {self.loss_names}")
        self.active_losses = stage.active_losses

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        prediction = self.head(self.body(batch["x"]))
        losses = {}
        if "mse" in self.active_losses:
            losses["mse"] = F.mse_loss(prediction.float(), batch["y"])
        if "l1" in self.active_losses:
            losses["l1"] = F.l1_loss(prediction.float(), batch["y"])
        if self.gradient_multiplier != 1.0:
            # Same value, gradient times k: loss + (k - 1) * (loss - stop_gradient(loss)).
            k = self.gradient_multiplier
            losses = {name: loss + (k - 1) * (loss - loss.detach()) for name, loss in losses.items()}
        return losses

    def after_optimizer_step(self) -> None:
        """Nothing to do after a step."""

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"body": list(self.body.parameters()), "head": list(self.head.parameters())}


TINY_TWO_STAGES: dict[str, Any] = {
    "head": {"trainable": ["head"], "lr": {"head": 0.05}, "loss_weights": {"mse": 1.0}},
    "body": {
        "trainable": ["body", "head"],
        "lr": {"body": 0.02, "head": 0.02},
        "epochs": 2,
        "loss_weights": {"mse": 1.0, "l1": 0.5},
    },
}
"""``train.stages`` of a two-stage run of :class:`TinyRegressionTask` (the head alone for an epoch, then body and
head for two), as the engine's resume and fault tests train it."""


class TinyGradientPenaltyTask(TinyRegressionTask):
    """:class:`TinyRegressionTask` plus two losses that are differentiated through a gradient (double backward).

    ``input_gradient``: mean over samples of ``||d(sum of the sample's outputs)/dx||^2``, the inner gradient taken
    w.r.t. the input with ``create_graph=True`` (the form of GradMask/RRR penalties). It is a per-sample mean, so a
    global batch split over ranks gives the same objective as one process.
    ``param_gradient``: ``||d mse/d theta||^2`` over the trainable parameters, the inner gradient taken w.r.t. the
    parameters. A squared norm of a batch gradient does not split over ranks, so the batch is cut into
    ``penalty_chunks`` equal slices and the penalties of the slices are averaged: one process with
    ``penalty_chunks = N`` has the objective of N ranks with ``penalty_chunks = 1``.

    Args:
        penalty_chunks: slices of the batch for ``param_gradient`` (must divide the batch size).
        **kwargs: passed to :class:`TinyRegressionTask`.
    """

    loss_names = ("mse", "l1", "input_gradient", "param_gradient")

    def __init__(self, penalty_chunks: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.penalty_chunks = penalty_chunks

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        """What the active losses need: a stage without the penalties runs on any strategy."""
        needs = set()
        if "input_gradient" in self.active_losses:
            needs.add("double_backward_input")
        if "param_gradient" in self.active_losses:
            needs.add("double_backward_params")
        return frozenset(needs)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        losses = super().forward(batch)
        if "input_gradient" in self.active_losses:
            x = batch["x"].detach().requires_grad_(True)
            outputs = self.head(self.body(x))
            (input_grad,) = torch.autograd.grad(outputs.sum(), x, create_graph=True)
            losses["input_gradient"] = input_grad.float().pow(2).sum(dim=1).mean()
        if "param_gradient" in self.active_losses:
            params = [p for p in self.parameters() if p.requires_grad]
            penalties = []
            for x, y in zip(batch["x"].chunk(self.penalty_chunks), batch["y"].chunk(self.penalty_chunks), strict=True):
                mse = F.mse_loss(self.head(self.body(x)).float(), y)
                grads = torch.autograd.grad(mse, params, create_graph=True)
                penalties.append(sum(g.float().pow(2).sum() for g in grads))
            losses["param_gradient"] = torch.stack(penalties).mean()
        return losses


class TinyAttackTask(TinyGradientPenaltyTask):
    """:class:`TinyGradientPenaltyTask` plus ``adversarial``: the MSE at points that PGD (``robustfm.attacks.pgd``,
    the attack FARE and TeCoA train with) found inside ``forward``, several forward/backward passes w.r.t. the input.

    The attacked "pixels" are ``sigmoid(x)`` (in [0, 1], as the attacks require) and the network sees
    ``6 * (pixels - 0.5)``; the attack maximizes the per-row squared error against ``y`` with random starts seeded
    per row by the sample index, so a row gets the same attack in any batch and on any rank: one process on the
    whole batch has the objective of N ranks on their shares.

    Args:
        attack_eps: Linf radius of the attack (the negative control makes it negligible).
        **kwargs: passed to :class:`TinyGradientPenaltyTask`.
    """

    loss_names = ("mse", "l1", "input_gradient", "param_gradient", "adversarial")

    def __init__(self, attack_eps: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.attack_eps = attack_eps

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        attack = {"in_task_attack"} if "adversarial" in self.active_losses else set()
        return super().needs | attack

    def on_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(6.0 * (pixels - 0.5)))

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        losses = super().forward(batch)
        if "adversarial" in self.active_losses:
            from robustfm.attacks import AttackConfig, pgd

            config = AttackConfig(eps=self.attack_eps, steps=3, step_size=self.attack_eps / 2, objective="embedding_l2")
            pixels = torch.sigmoid(batch["x"].float())
            seeds = [int(i) for i in batch["index"]]
            found = pgd(
                self.on_pixels,
                pixels,
                {"target": batch["y"]},
                config,
                row_seeds=seeds,
                eval_modules=self,
                score_last=False,
            )
            losses["adversarial"] = F.mse_loss(self.on_pixels(found.x_adv).float(), batch["y"])
        return losses


def build_tiny_task(**kwargs: Any) -> TinyRegressionTask:
    """Factory for :class:`TinyRegressionTask` (use ``functools.partial`` to bind arguments; it pickles)."""
    return TinyRegressionTask(**kwargs)


class SyntheticBatchSource:
    """Fixed random regression data held in memory; batches depend only on (epoch, rank, world size, index).

    Args:
        num_samples: rows of the data set. global_batch_size: samples per optimizer micro-step over all ranks
            (must divide by the world size). in_dim, out_dim: feature and target sizes. seed: data and shuffles.
    """

    def __init__(
        self, num_samples: int = 256, global_batch_size: int = 32, in_dim: int = 16, out_dim: int = 4, seed: int = 0
    ) -> None:
        if global_batch_size < 1 or num_samples < global_batch_size:
            raise ValueError(f"need 1 <= global_batch_size <= num_samples, got {global_batch_size} and {num_samples}")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.seed = seed

    def _data(self) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.num_samples, self.in_dim, generator=generator)
        mixing = torch.randn(self.in_dim, self.out_dim, generator=generator)
        y = torch.tanh(0.5 * x @ mixing) + 0.05 * torch.randn(self.num_samples, self.out_dim, generator=generator)
        return x, y

    def _per_rank(self, world_size: int) -> int:
        if self.global_batch_size % world_size:
            raise ValueError(f"global_batch_size {self.global_batch_size} does not split over {world_size} ranks")
        return self.global_batch_size // world_size

    def num_batches(self, epoch: int, rank: int, world_size: int) -> int:
        self._per_rank(world_size)
        return self.num_samples // self.global_batch_size

    def batches(self, epoch: int, rank: int, world_size: int, skip_batches: int = 0) -> Iterator[dict[str, Any]]:
        per_rank = self._per_rank(world_size)
        x, y = self._data()
        order = torch.randperm(
            self.num_samples, generator=torch.Generator().manual_seed(epoch_seed(self.seed, epoch, "shuffle"))
        )
        for index in range(skip_batches, self.num_batches(epoch, rank, world_size)):
            start = index * self.global_batch_size + rank * per_rank
            rows = order[start : start + per_rank]
            yield {"x": x[rows], "y": y[rows], "index": rows}
