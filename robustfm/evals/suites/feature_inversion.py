"""Feature inversion (paper 003 eq. 9, App. A-B, Table VII): how much of an image can be read back from its embedding?

For each image x: start from grey 0.5 + U(-8/255, 8/255) (seeded per image), run APGD minimizing
||n(f(z)) - n(f(x))||^2 over z in an L2 ball of radius ``radius`` (100) around that start, which acts as a
regulariser, for ``steps`` (500) iterations; APGD's first step is 2 x radius = 200, the paper's. Reported: the cosine
of each inversion's embedding to the original's (Table VII's number; near 1 means the optimisation reached the
embedding) and a PNG grid per model, originals above their inversions (the picture is the point: a robust encoder's
inversions look like the image). GPU-sized at the paper's 224 px and 500 steps; small sizes run on CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from robustfm.config.core import check
from robustfm.evals import SUITES
from robustfm.evals.actors import FieldSpec, ScoringActor
from robustfm.evals.config import EvalDataConfig
from robustfm.evals.metrics import MetricSpec, MetricTable
from robustfm.evals.suite import Suite, SuiteOutput

START_NOISE = 8 / 255


@dataclass(frozen=True)
class FeatureInversionConfig:
    """Inverting image embeddings with APGD (paper 003's Table VII protocol)."""

    data: EvalDataConfig = field(default_factory=lambda: EvalDataConfig(max_samples=100))
    """The images to invert (paper: 100 COCO images)."""
    steps: int = 500
    radius: float = 100.0
    """L2 radius around the start (a regulariser; APGD's first step is twice it)."""
    grid_images: int = 8
    """Originals (and their inversions) shown in the PNG grid."""

    def __post_init__(self) -> None:
        check(self.steps >= 1, "steps", self.steps, "must be >= 1")
        check(self.radius > 0, "radius", self.radius, "must be > 0")
        check(self.grid_images >= 1, "grid_images", self.grid_images, "must be >= 1")


def inversion_start(sample_id: str, seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Grey 0.5 + U(-8/255, 8/255), drawn from a seed of (id, run seed): the same start in any batch."""
    from robustfm.seeding import sample_seed

    rng = np.random.default_rng(sample_seed(sample_id, 0, "feature_inversion/start", seed))
    return (0.5 + rng.uniform(-START_NOISE, START_NOISE, size=shape)).astype(np.float32)


class InversionScorer(ScoringActor):
    """Each image's inversion: its cosine to the original in embedding space, and its pixels (for the grid)."""

    needs_gradients = True

    def output_fields(self) -> dict[str, FieldSpec]:
        size = self.model.image_size
        return {
            "cosine": (np.float64, ()),
            "attack_failed": (np.int8, ()),
            "original": (np.uint8, (size, size, 3)),
            "inversion": (np.uint8, (size, size, 3)),
        }

    def score(self, batch: Mapping[str, np.ndarray], pixels: Any) -> list[dict[str, Any]]:
        import torch

        from robustfm.attacks import AttackConfig, apgd

        ids = [str(i) for i in batch["id"]]
        with torch.no_grad():
            target = self.model.encode_image(pixels).float()
        starts = np.stack([inversion_start(i, self.seed, tuple(pixels.shape[1:])) for i in ids])
        start = torch.from_numpy(starts).to(pixels.device)
        config = AttackConfig(
            norm="l2",
            eps=float(self.params["radius"]),
            steps=self.params["steps"],
            random_start=False,  # the start is the seeded noisy grey itself
            objective="inversion",
            precision=self.gradient_precision,
        )
        result = apgd(self.model.encode_image, start, {"target": target}, config, eval_modules=self.model)
        with torch.no_grad():
            reached = torch.nn.functional.cosine_similarity(self.model.encode_image(result.x_adv).float(), target)
        return [
            {
                "id": sample,
                "cosine": float(c),
                "attack_failed": int(f),
                "original": _to_uint8(o),
                "inversion": _to_uint8(z),
            }
            for sample, c, f, o, z in zip(
                ids, reached.cpu(), result.failed.cpu(), pixels.cpu(), result.x_adv.cpu(), strict=True
            )
        ]


def _to_uint8(pixels: Any) -> np.ndarray:
    return (pixels.detach().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def image_grid(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """Two rows of ``[N, S, S, 3]`` pictures side by side, with a 2-pixel white gap: originals above inversions."""
    count, size = top.shape[0], top.shape[1]
    gap = 2
    grid = np.full((2 * size + gap, count * size + (count - 1) * gap, 3), 255, dtype=np.uint8)
    for index in range(count):
        left = index * (size + gap)
        grid[:size, left : left + size] = top[index]
        grid[size + gap :, left : left + size] = bottom[index]
    return grid


@SUITES.register("feature_inversion", config=FeatureInversionConfig)
class FeatureInversionSuite(Suite):
    name = "feature_inversion"
    version = "1"
    scorer = InversionScorer
    metric_specs = (
        MetricSpec("cosine", "higher", "cosine of the inversion's embedding to the original image's"),
        MetricSpec("failed", "lower", "share of images whose inversion met a non-finite loss or gradient"),
    )

    def scorer_params(self, dataset: Any) -> dict[str, Any]:
        return {
            "steps": self.section.steps,
            "radius": float(self.section.radius),
            "start": f"0.5 + U(-{START_NOISE:.6f}, {START_NOISE:.6f}) per pixel, seeded by (id, run seed)",
            "objective": "min ||n(f(z)) - n(f(x))||^2, APGD L2 around the start, first step 2 x radius",
        }

    def aggregate(self, rows: Mapping[str, np.ndarray], params: Mapping[str, Any]) -> SuiteOutput:
        cosine = np.asarray(rows["cosine"], dtype=np.float64)
        failed = np.asarray(rows["attack_failed"])
        metrics, table = MetricTable(), []
        metrics.add("mean/cosine", float(cosine.mean()), self.spec("cosine"))
        metrics.add("min/cosine", float(cosine.min()), self.spec("cosine"))
        metrics.add("failed", float(failed.mean()), self.spec("failed"))
        table += [{"id": str(i), "cosine": float(c)} for i, c in zip(rows["id"], cosine, strict=True)]
        shown = slice(0, self.section.grid_images)
        grid = image_grid(np.asarray(rows["original"])[shown], np.asarray(rows["inversion"])[shown])
        return SuiteOutput(metrics, table, [], images={"inversions": grid})
