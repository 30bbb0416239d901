"""Ray Data stages for CG-CLIP and the robustness studies: corrupt, ground-truth map, perturb; and the CG-CLIP pipeline.

A stage is ``(dataset, epoch) -> dataset`` (see :data:`robustfm.data.batch_source.Stage`), so the same stage objects
plug into :class:`robustfm.data.ShardBatchSource` and into :func:`build_cgclip_pipeline`::

    shards -> decode (image) -> corrupt (corrupted, corruption, severity) -> gt_map (map)

Every random choice is a function of (run seed, sample id, epoch): the corruption and severity come from
``sample_seed(id, epoch, "corruption", run_seed)`` and the corruption's own draws from
``sample_seed(id, epoch, "corruption_draws", run_seed)``, so a row gets the same corrupted pixels in any batch, on
any worker and on every rerun. Corruptions run as Ray tasks on CPU; ground-truth maps are a frozen-model stage
(:func:`robustfm.data.frozen_stage.frozen_model_stage`): an actor pool whose actors each build their mapper (e.g. a
VGG-16) once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from robustfm.data.frozen_stage import frozen_model_stage, keep_columns
from robustfm.data.stage_config import CorruptionStageConfig, FrozenStageConfig
from robustfm.gtmaps.config import GTMapConfig
from robustfm.seeding import sample_seed

if TYPE_CHECKING:
    import ray.data

Stage = Callable[["ray.data.Dataset", int], "ray.data.Dataset"]


def resolve_corruptions(corruption_set: str | Sequence[str]) -> tuple[str, ...]:
    """A set name ("seen", "unseen", "imagenet_c", "all"), a comma-separated list, or a sequence of names."""
    from robustfm.corruptions import CORRUPTION_SETS, CORRUPTIONS

    if isinstance(corruption_set, str):
        if corruption_set in CORRUPTION_SETS:
            return tuple(CORRUPTION_SETS[corruption_set])
        names = tuple(part.strip() for part in corruption_set.split(",") if part.strip())
    else:
        names = tuple(corruption_set)
    if not names:
        raise ValueError(f"corruption set {corruption_set!r} names no corruption (sets: {', '.join(CORRUPTION_SETS)})")
    for name in names:
        CORRUPTIONS.check(name)  # unknown names raise with "did you mean"
    return names


def _float_images(column: Any) -> np.ndarray:
    # Ray hands out read-only views of its blocks; torch wants writable memory.
    return np.array(column, dtype=np.float32, copy=True)


def _ids(batch: dict[str, Any], stage: str) -> list[str]:
    if "id" not in batch:
        raise KeyError(f"{stage} stage needs an 'id' column to seed per-sample draws; columns: {sorted(batch)}")
    return [str(i) for i in batch["id"]]


# --- corrupt -------------------------------------------------------------------------------------------------------


class CorruptBatch:
    """Ray Data UDF (a task): adds ``corrupted`` float32 [3,H,W], ``corruption`` str and ``severity`` int64."""

    def __init__(self, names: tuple[str, ...], severities: tuple[int, ...], run_seed: int, epoch: int) -> None:
        self.names, self.severities, self.run_seed, self.epoch = names, severities, run_seed, epoch

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        from robustfm.corruptions import corrupt_batch, draw_corruption

        ids = _ids(batch, "corrupt")
        picks = [
            draw_corruption(sample_seed(i, self.epoch, "corruption", self.run_seed), self.names, self.severities)
            for i in ids
        ]
        names = [name for name, _ in picks]
        severities = [severity for _, severity in picks]
        seeds = [sample_seed(i, self.epoch, "corruption_draws", self.run_seed) for i in ids]
        images = torch.from_numpy(_float_images(batch["image"]))
        out = keep_columns(batch)
        out["corrupted"] = corrupt_batch(images, names, severities, seeds).numpy()
        out["corruption"] = np.array(names, dtype=object)
        out["severity"] = np.array(severities, dtype=np.int64)
        return out


def corrupt_stage(
    corruption_set: str | Sequence[str] = "seen",
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    run_seed: int = 0,
    batch_size: int = 64,
) -> Stage:
    """A stage corrupting each row's ``image`` with a corruption and severity drawn uniformly per sample and epoch.

    Args:
        corruption_set: a ``CORRUPTION_SETS`` name, comma-separated names, or a sequence of names.
        severities: drawn uniformly (CG-CLIP: 1..5).
        run_seed: the run's seed; with the row's ``id`` and the epoch it fixes every draw.
        batch_size: rows per task.
    """
    from robustfm.corruptions import check_severity

    names = resolve_corruptions(corruption_set)
    severities = tuple(check_severity(s) for s in severities)
    if not severities:
        raise ValueError("corrupt_stage needs at least one severity")

    def stage(ds: ray.data.Dataset, epoch: int) -> ray.data.Dataset:
        udf = CorruptBatch(names, severities, run_seed, epoch)
        return ds.map_batches(udf, batch_size=batch_size, batch_format="numpy", zero_copy_batch=True)

    return stage


# --- ground-truth maps -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GTMapLoader:
    """Builds a ground-truth mapper on a device: the ``loader`` of the GT-map frozen-model stage (plain data, so it
    travels to the actors)."""

    name: str
    weights: str | None = None
    layers: tuple[int, ...] | None = None
    scale: float | None = None

    def __call__(self, device: str) -> Any:
        from robustfm.gtmaps import build_gt_mapper

        return build_gt_mapper(self.name, weights=self.weights, layers=self.layers, scale=self.scale).to(device)


def gt_map_stage(
    mapper_name: str = "vgg16_l1",
    weights: str | None = None,
    layers: Sequence[int] | None = None,
    scale: float | None = None,
    min_actors: int = 1,
    max_actors: int = 1,
    num_gpus: float = 0.0,
    batch_size: int = 32,
    num_cpus: float = 1.0,
    *,
    clean_column: str = "image",
    corrupted_column: str = "corrupted",
    output_column: str = "map",
) -> Stage:
    """A stage adding ground-truth maps, computed by an autoscaling pool of actors that each hold one mapper.

    Args:
        mapper_name, weights, layers, scale: passed to :func:`robustfm.gtmaps.build_gt_mapper` in each actor
            (a local ``weights`` path must exist on the nodes running the actors).
        min_actors, max_actors: the actor pool's size range (``ray.data.ActorPoolStrategy``).
        num_gpus: GPUs per actor; with any, the mapper runs on ``cuda``.
        batch_size: rows per actor call.
        num_cpus: CPUs per actor.
        clean_column, corrupted_column, output_column: which columns to compare and where the map goes (e.g.
            ``corrupted_column="image"`` maps each clean image against itself: all zeros).
    """
    config = GTMapConfig(
        name=mapper_name,
        weights=weights,
        layers=None if layers is None else tuple(layers),
        scale=scale,
        min_actors=min_actors,
        max_actors=max_actors,
        num_gpus=num_gpus,
        num_cpus=num_cpus,
        batch_size=batch_size,
    )  # checks every argument before Ray sees it
    loader = GTMapLoader(config.name, config.weights, config.layers, config.scale)
    pool = FrozenStageConfig(
        min_actors=config.min_actors,
        max_actors=config.max_actors,
        num_cpus=config.num_cpus,
        num_gpus=config.num_gpus,
        batch_size=config.batch_size,
    )
    # The mapper's forward is (clean, corrupted) -> float32 [N, 1, H, W] maps: the default apply.
    return frozen_model_stage(loader, inputs=(clean_column, corrupted_column), output=output_column, pool=pool)


def gt_map_stage_from_config(config: GTMapConfig) -> Stage:
    """:func:`gt_map_stage` with the fields of a :class:`~robustfm.gtmaps.config.GTMapConfig`."""
    return gt_map_stage(
        config.name,
        config.weights,
        config.layers,
        config.scale,
        config.min_actors,
        config.max_actors,
        config.num_gpus,
        config.batch_size,
        config.num_cpus,
    )


# --- perturb -------------------------------------------------------------------------------------------------------


class PerturbBatch:
    """Ray Data UDF: adds ``perturbed`` float32 [K,3,H,W] (one image per value), ``perturbation`` str and
    ``perturbation_values`` float32 [K]."""

    def __init__(self, name: str, values: tuple[float, ...], run_seed: int, epoch: int) -> None:
        self.name, self.values, self.run_seed, self.epoch = name, values, run_seed, epoch

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        from robustfm.perturbations import perturb

        ids = _ids(batch, "perturb")
        images = torch.from_numpy(_float_images(batch["image"]))
        edited = []
        for step, value in enumerate(self.values):
            generators = [
                torch.Generator().manual_seed(sample_seed(i, self.epoch, f"perturb/{self.name}/{step}", self.run_seed))
                for i in ids
            ]
            edited.append(perturb(images, self.name, value, generators))
        out = keep_columns(batch)
        out["perturbed"] = torch.stack(edited, dim=1).numpy()
        out["perturbation"] = np.array([self.name] * len(ids), dtype=object)
        out["perturbation_values"] = np.tile(np.asarray(self.values, dtype=np.float32), (len(ids), 1))
        return out


def perturb_stage(name: str, values: Sequence[float] | int, run_seed: int = 0, batch_size: int = 16) -> Stage:
    """A stage adding every row's image edited by perturbation (or geometric variant) ``name`` at each value.

    Args:
        name: a ``PERTURBATIONS`` or ``GEOMETRIC_VARIANTS`` name.
        values: the parameter values, or an integer ``n`` for ``sweep(name, n)`` (equally spaced over the range).
        run_seed: seeds random edits (gaussian_noise) per sample, epoch and value.
        batch_size: rows per task (each row grows K-fold).
    """
    from robustfm.perturbations import perturbation_meta, sweep

    perturbation_meta(name)  # unknown names fail here, on the driver
    chosen = tuple(sweep(name, values)) if isinstance(values, int) else tuple(float(v) for v in values)
    if not chosen:
        raise ValueError(f"perturb_stage({name!r}) needs at least one value")

    def stage(ds: ray.data.Dataset, epoch: int) -> ray.data.Dataset:
        udf = PerturbBatch(name, chosen, run_seed, epoch)
        return ds.map_batches(udf, batch_size=batch_size, batch_format="numpy", zero_copy_batch=True)

    return stage


class RandomPerturbBatch:
    """Ray Data UDF: one everyday edit per row, drawn per (sample, epoch): adds ``perturbed`` float32 [3,H,W],
    ``perturbation`` str and ``perturbation_value`` float32."""

    def __init__(self, grid: dict[str, tuple[float, ...]], run_seed: int, epoch: int) -> None:
        self.grid, self.run_seed, self.epoch = grid, run_seed, epoch

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        from robustfm.perturbations import perturb

        ids = _ids(batch, "random perturb")
        names = sorted(self.grid)
        picks = []
        for sample_id in ids:
            rng = np.random.default_rng(sample_seed(sample_id, self.epoch, "random_perturbation", self.run_seed))
            name = names[int(rng.integers(len(names)))]
            picks.append((name, self.grid[name][int(rng.integers(len(self.grid[name])))]))
        images = torch.from_numpy(_float_images(batch["image"]))
        edited = torch.empty_like(images)
        # Rows sharing an edit are edited together; noise draws come from each row's own generator.
        for name, value in sorted(set(picks)):
            rows = [i for i, pick in enumerate(picks) if pick == (name, value)]
            generators = [
                torch.Generator().manual_seed(sample_seed(ids[i], self.epoch, f"perturb/{name}", self.run_seed))
                for i in rows
            ]
            edited[rows] = perturb(images[rows], name, value, generators)
        out = keep_columns(batch)
        out["perturbed"] = edited.numpy()
        out["perturbation"] = np.array([name for name, _ in picks], dtype=object)
        out["perturbation_value"] = np.array([value for _, value in picks], dtype=np.float32)
        return out


def random_perturb_stage(
    names: Sequence[str] | None = None, values_per_perturbation: int = 5, run_seed: int = 0, batch_size: int = 16
) -> Stage:
    """A stage giving every row one everyday edit: a perturbation drawn uniformly from ``names`` (None: every
    registered one) and a value drawn uniformly from its ``sweep(name, values_per_perturbation)`` grid (equally
    spaced over the documented range, ends included), both fixed by (run seed, sample id, epoch)."""
    from robustfm.perturbations import PERTURBATIONS, sweep

    chosen = list(PERTURBATIONS.names() if names is None else names)
    if not chosen:
        raise ValueError("random_perturb_stage needs at least one perturbation")
    grid = {name: tuple(sweep(name, values_per_perturbation)) for name in chosen}  # unknown names fail here

    def stage(ds: ray.data.Dataset, epoch: int) -> ray.data.Dataset:
        udf = RandomPerturbBatch(grid, run_seed, epoch)
        return ds.map_batches(udf, batch_size=batch_size, batch_format="numpy", zero_copy_batch=True)

    return stage


# --- the CG-CLIP pipeline ------------------------------------------------------------------------------------------


def cgclip_stages(
    corruption: CorruptionStageConfig | None = None, gt_map: GTMapConfig | None = None, run_seed: int = 0
) -> list[Stage]:
    """The stages after decoding for CG-CLIP training: corrupt, then ground-truth map (for ``ShardBatchSource``)."""
    corruption = corruption or CorruptionStageConfig()
    gt_map = gt_map or GTMapConfig()
    return [
        corrupt_stage(corruption.corruption_set, corruption.severities, run_seed, corruption.batch_size),
        gt_map_stage_from_config(gt_map),
    ]


def build_cgclip_pipeline(
    shards_path: str,
    split: str = "train",
    image_size: int = 224,
    corruption_set: str | Sequence[str] = "seen",
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    gt_map: GTMapConfig | None = None,
    seed: int = 0,
    epoch: int = 0,
    *,
    train: bool = True,
    endpoint_url: str | None = None,
) -> ray.data.Dataset:
    """shards -> decode -> corrupt -> ground-truth map, as one lazy Ray Dataset.

    Columns: ``image`` and ``corrupted`` float32 [3, S, S] in [0,1], ``map`` float32 [1, S, S] in [0,1],
    ``corruption`` (name), ``severity`` (1..5), plus the shard's ``id``, ``label``, ``class_name``, ``captions``
    and ``epoch``. Everything random is a function of (``seed``, id, ``epoch``).

    Args:
        shards_path: shard directory (local or ``s3://``) written by ``jobs/prepare_data.py``.
        split: which split to read.
        image_size: side of the decoded square images.
        corruption_set, severities: what :func:`corrupt_stage` draws from.
        gt_map: the map settings (default :class:`GTMapConfig`: VGG-16 with torchvision's ImageNet weights).
        seed: the run seed (crops, flips, corruptions).
        epoch: the epoch (a new draw of crops and corruptions per epoch).
        train: seeded random-resized crops and flips (True) or the eval resize + centre crop.
        endpoint_url: S3-compatible endpoint, when not AWS.
    """
    from robustfm.data.reading import decode_images, open_shards

    corruption = CorruptionStageConfig(
        corruption_set=corruption_set if isinstance(corruption_set, str) else ",".join(corruption_set),
        severities=tuple(severities),
    )
    stages = cgclip_stages(corruption, gt_map, run_seed=seed)  # built (and checked) before any data is read
    ds = decode_images(open_shards(shards_path, split, endpoint_url=endpoint_url), image_size, train, seed, epoch)
    for stage in stages:
        ds = stage(ds, epoch)
    return ds
