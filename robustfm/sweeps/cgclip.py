"""CG-CLIP as a sweepable recipe: a trial trains some stages of the curriculum and is validated after every epoch.

The target metric, ``val/auroc``, is the zero-shot clean-vs-corrupted detection AUROC of the current weights on the
recipe's held-out validation split: every ``round(1 / data.holdout_fraction)``-th image of ``data.train_split``,
which the training batches exclude (``holdout_role="only"`` here, ``"exclude"`` there). Each held-out image is scored
clean and corrupted once, with a corruption and severity drawn as in training (``corrupt_stage``, epoch 0, so every
epoch and every trial see the same validation images); P(corrupt) is the two-prompt softmax over the method's own
``clean_prompts`` / ``corrupt_prompts`` (each kind's normalized text embeddings averaged).

How it relates to the ``corruption_detection`` evaluation suite: the suite measures the same quantity (zero-shot
AUROC of P(corrupt), :func:`robustfm.evals.metrics.two_prompt_probability` + ``detection_metrics``), but on the
evaluation split, for every corruption of the seen and unseen sets, with the evaluation prompts, through an actor
pool, on a saved checkpoint. The sweep metric is its cheap in-loop estimate on data that neither training nor the
final evaluation uses, so choosing lambda on it does not leak the test set (paper 000, A.1: "a held-out validation
split of the training data"). ``val/accuracy`` and ``val/f1`` (at P > 0.5) and ``train/loss`` (the last logged
window) are reported too.

A trial whose loss or weights are no longer finite (a diverging learning rate) reports ``val/diverged = 1`` and the
worst value of every metric (AUROC 0), so ASHA stops it and Optuna learns from it, instead of Tune crashing on NaN.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustfm.config import ConfigError, ModelConfig
from robustfm.methods.cgclip_config import CGClipConfig
from robustfm.recipes.cgclip_config import CGClipRecipeConfig, check_paths
from robustfm.sweeps.recipes import REPO_ROOT

VALIDATION_BATCH = 64


@dataclass
class CGClipValidation:
    """The engine's ``on_epoch_end`` hook for CG-CLIP (picklable; runs on rank 0 of the trial's Train run).

    Args:
        model, method: to rebuild the task that the reported weights load into.
        source: the held-out validation images with their corrupted copies (eval transform, one pass).
    """

    model: ModelConfig
    method: CGClipConfig
    source: Any
    _task: Any = field(default=None, repr=False)
    _images: Any = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_task": None, "_images": None}  # rebuilt where the hook runs

    def __call__(self, stage: str, epoch: int, model_state: dict[str, Any], last: dict[str, Any]) -> dict[str, float]:
        import torch

        from robustfm.evals.metrics import detection_metrics, two_prompt_probability

        loss = float(last.get("loss/total", 0.0))
        weights_finite = all(bool(torch.isfinite(t).all()) for t in model_state.values() if t.is_floating_point())
        if not (math.isfinite(loss) and weights_finite):
            return {**CGCLIP_SWEEP.diverged_values, "val/diverged": 1.0, "train/loss": _finite_or(loss, 1e30)}
        task = self._load_task()
        task.load_state_dict(model_state)
        clean, corrupted = self._load_images()
        model = task.model
        with torch.no_grad():
            embeddings = model.encode_image(torch.cat([clean, corrupted]), normalize=True).double().numpy()
            clean_text = _mean_direction(model.clip.encode_text(list(self.method.clean_prompts), normalize=True))
            corrupt_text = _mean_direction(model.clip.encode_text(list(self.method.corrupt_prompts), normalize=True))
            scale = float(model.clip.logit_scale.exp().clamp(max=100.0))
        scores = two_prompt_probability(embeddings, clean_text, corrupt_text, scale)
        if not all(math.isfinite(s) for s in scores):
            return {**CGCLIP_SWEEP.diverged_values, "val/diverged": 1.0, "train/loss": _finite_or(loss, 1e30)}
        labels = [0] * len(clean) + [1] * len(corrupted)
        metrics = {f"val/{k}": v for k, v in detection_metrics(labels, scores).items()}
        return {**metrics, "val/diverged": 0.0, "train/loss": loss}

    def _load_task(self) -> Any:
        from robustfm.recipes.cgclip import CGClipTaskBuilder

        if self._task is None:
            self._task = CGClipTaskBuilder(self.model, self.method)().eval()
        return self._task

    def _load_images(self) -> tuple[Any, Any]:
        import torch

        if self._images is None:
            batches = list(self.source.batches(epoch=0, rank=0, world_size=1, skip_batches=0))
            if not batches:
                raise ValueError("the validation split holds no full batch: raise data.holdout_fraction")
            self._images = (
                torch.cat([b["image"] for b in batches]).float(),
                torch.cat([b["corrupted"] for b in batches]).float(),
            )
        return self._images


def _mean_direction(embeddings: Any) -> Any:
    mean = embeddings.double().mean(0)
    return (mean / mean.norm()).numpy()


def _finite_or(value: float, fallback: float) -> float:
    return value if math.isfinite(value) else fallback


class CGClipSweep:
    """The sweep adapter of ``robustfm.recipes.cgclip`` (see :class:`robustfm.sweeps.recipes.SweepableRecipe`)."""

    config_class = CGClipRecipeConfig
    default_config = REPO_ROOT / "configs" / "cgclip" / "demo.yaml"
    metrics = {"val/auroc": "max", "val/accuracy": "max", "val/f1": "max", "train/loss": "min"}
    diverged_values = {"val/auroc": 0.0, "val/accuracy": 0.0, "val/f1": 0.0}

    def default_stages(self, cfg: CGClipRecipeConfig) -> tuple[str, ...]:
        return tuple(cfg.curriculum)

    def check(self, cfg: CGClipRecipeConfig, stages: Sequence[str], init_weights: str | None) -> None:
        for stage in stages:
            if stage not in cfg.train.stages:
                raise ConfigError("stages", f"{stage!r} is not a stage of train.stages ({', '.join(cfg.train.stages)})")
        if cfg.train.launcher != "ray":
            raise ConfigError("train.launcher", "a sweep trial reports through Ray Train: it must be 'ray'")
        if cfg.data.holdout_fraction <= 0:
            raise ConfigError("data.holdout_fraction", "a sweep validates on the held-out split: it must be > 0")
        if init_weights is not None and not Path(init_weights).is_file():
            raise ConfigError("init_weights", f"weights file {init_weights!r} does not exist")
        problems = check_paths(cfg)
        if problems:
            raise ConfigError("data", "; ".join(problems))

    def prepare(self, cfg: CGClipRecipeConfig) -> CGClipRecipeConfig:
        if cfg.data.shards is not None:
            return cfg
        from robustfm.recipes.cgclip import _demo_shards  # the demo set, built once and shared by every trial

        out = Path(cfg.output_dir).resolve() / cfg.name
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=_demo_shards(cfg, out)))

    def train_trial(
        self,
        cfg: CGClipRecipeConfig,
        stages: Sequence[str],
        init_weights: str | None,
        run_name: str,
        run_callbacks: Sequence[Any],
        tracking_uri: str | None,
        parent_run_id: str | None,
    ) -> dict[str, Any]:
        from robustfm.recipes.cgclip import CGClipTaskBuilder, evaluation_batches, training_batches
        from robustfm.train import fit

        shards = cfg.data.shards

        def validation_source(batch_size: int) -> Any:
            split = cfg.data.train_split
            return evaluation_batches(cfg, shards, split, batch_size, cfg.seed, heldout_only=True)

        # Batches of at most VALIDATION_BATCH images; a smaller split is one batch, so no held-out image is dropped.
        validation = validation_source(max(1, min(VALIDATION_BATCH, validation_source(1).num_rows)))
        train_cfg = dataclasses.replace(cfg.train, stages={s: cfg.train.stages[s] for s in stages}, seed=cfg.seed)
        result = fit(
            train_cfg,
            CGClipTaskBuilder(cfg.model, cfg.method, init_weights),
            training_batches(cfg, shards, list(stages)),
            tracking_uri=tracking_uri,
            experiment=cfg.tracking.experiment,
            parent_run_id=parent_run_id,
            run_name=run_name,
            on_epoch_end=CGClipValidation(cfg.model, cfg.method, validation),
            run_callbacks=run_callbacks,
        )
        return result.metrics


CGCLIP_SWEEP = CGClipSweep()
