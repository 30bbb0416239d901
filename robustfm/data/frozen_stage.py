"""A Ray Data stage that runs a frozen model over some columns and writes its output to a new column.

Each actor of an autoscaling pool (``ray.data.ActorPoolStrategy``) loads the model once, then turns batches of
input columns into the output column, on CPU or GPU. Uses: a frozen teacher's embeddings of the clean image as a
training target (FARE, fine-tuning with a feature-distance loss), VGG-16 ground-truth corruption maps (CG-CLIP,
:func:`robustfm.data.corruption_stages.gt_map_stage`)::

    stage = frozen_model_stage(EmbeddingLoader("open_clip/ViT-B-32", "openai"), inputs=("image",), output="target",
                               apply=encode_image, pool=FrozenStageConfig(max_actors=2, num_gpus=0.5))
    source = ShardBatchSource(path, "train", 224, 64, train=True, stages=[stage])

The model travels to the Ray workers as plain data: ``loader`` (``device -> model``) and ``apply``
(``(model, *input tensors) -> output tensor``) must pickle with the standard :mod:`pickle` (module-level functions,
or instances of module-level frozen dataclasses with ``__call__``), which is checked before Ray runs anything.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from robustfm.data.stage_config import FrozenStageConfig

if TYPE_CHECKING:
    import ray.data

    from robustfm.data.batch_source import Stage

Loader = Callable[[str], Any]
"""``device -> model``: builds the frozen model (in eval mode) on ``device`` ("cpu" or "cuda")."""
Apply = Callable[..., Any]
"""``(model, *inputs) -> output``: input columns as torch tensors on the model's device; returns a tensor."""


def call_model(model: Any, *inputs: Any) -> Any:
    """The default ``apply``: ``model(*inputs)``."""
    return model(*inputs)


def encode_image(model: Any, pixels: Any) -> Any:
    """``apply`` for robustfm models: unnormalized float32 image embeddings (N, E) of [0, 1] pixels."""
    return model.encode_image(pixels, normalize=False).float()


@dataclass(frozen=True)
class EmbeddingLoader:
    """Loads ``robustfm.models.create_model(name, pretrained)``, optionally overlaid with local weights, frozen.

    Attributes:
        name: ``family/arch`` (``open_clip/ViT-B-32``, ``open_clip/tiny-vit``, ...).
        pretrained: a pretrained tag, a local weights path, or None (random init, seeded by ``init_seed``).
        weights: a local safetensors (or torch) state dict of the model loaded over it
            (:func:`robustfm.models.weights.load_weights`); must exist on the nodes running the actors.
        init_seed: torch seed before building, so that a random-init model is the same network in every actor.
    """

    name: str
    pretrained: str | None = None
    weights: str | None = None
    init_seed: int = 0

    def __call__(self, device: str) -> Any:
        import torch

        from robustfm.models import create_model
        from robustfm.models.weights import load_weights

        torch.manual_seed(self.init_seed)
        model = create_model(self.name, pretrained=self.pretrained)
        if self.weights is not None:
            load_weights(model, self.weights)
        return model.eval().requires_grad_(False).to(device)


def keep_columns(batch: dict[str, Any]) -> dict[str, Any]:
    """A copy of a numpy batch to add columns to; ragged caption lists stay Python lists (Ray stores them as
    ``list<string>``)."""
    out = dict(batch)
    if "captions" in out:
        out["captions"] = [list(c) for c in out["captions"]]
    return out


class FrozenModelActor:
    """Ray Data actor: loads the model in ``__init__``, then adds ``output`` = ``apply(model, *inputs)`` to batches."""

    def __init__(
        self, loader: Loader, apply: Apply, inputs: tuple[str, ...], output: str, device: str, threads: int
    ) -> None:
        import torch

        torch.set_num_threads(threads)
        self.device = device
        self.apply = apply
        self.inputs = inputs
        self.output = output
        self.model = loader(device)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        missing = [name for name in self.inputs if name not in batch]
        if missing:
            raise KeyError(f"frozen-model stage reads column(s) {missing}; the batch has {sorted(batch)}")
        # Ray hands out read-only views of its blocks; torch wants writable memory.
        tensors = [torch.from_numpy(np.array(batch[name], copy=True)).to(self.device) for name in self.inputs]
        with torch.inference_mode():
            result = self.apply(self.model, *tensors)
        out = keep_columns(batch)
        out[self.output] = result.detach().cpu().numpy()
        return out


def _check_picklable(what: str, value: Any) -> None:
    try:
        pickle.dumps(value)
    except (pickle.PicklingError, AttributeError, TypeError) as err:
        raise TypeError(
            f"frozen_model_stage: {what} {value!r} does not pickle ({err}); describe the model as plain data: a "
            "module-level function or an instance of a module-level frozen dataclass with __call__"
        ) from None


def frozen_model_stage(
    loader: Loader,
    inputs: Sequence[str] = ("image",),
    output: str = "target",
    apply: Apply = call_model,
    pool: FrozenStageConfig | None = None,
) -> Stage:
    """A stage adding ``output`` = ``apply(model, *inputs)``, computed by a pool of actors that each load the model.

    Args:
        loader: ``device -> model`` (see :class:`EmbeddingLoader`); called once per actor.
        inputs: the columns passed to ``apply``, in order, as torch tensors on the actor's device (dtype kept:
            decoded images are float32 [N, 3, S, S] in [0, 1], masks uint8 [N, 1, S, S]).
        output: the column written (the result moved to the CPU, as numpy).
        apply: ``(model, *inputs) -> tensor``; runs under ``torch.inference_mode``.
        pool: actors, CPUs / GPUs per actor (with GPUs the model runs on ``cuda``) and rows per call.

    Raises:
        TypeError: when ``loader`` or ``apply`` does not pickle (checked here, before Ray runs anything).
        ValueError: for an empty ``inputs`` or ``output``.
    """
    pool = pool or FrozenStageConfig()
    inputs = tuple(inputs)
    if not inputs or not all(isinstance(name, str) and name for name in inputs):
        raise ValueError(f"frozen_model_stage: inputs must name at least one column, got {inputs!r}")
    if not output:
        raise ValueError("frozen_model_stage: output must name the column to write")
    _check_picklable("loader", loader)
    _check_picklable("apply", apply)
    constructor = (loader, apply, inputs, output, pool.device, pool.threads)

    def stage(ds: ray.data.Dataset, epoch: int) -> ray.data.Dataset:
        import ray.data

        return ds.map_batches(
            FrozenModelActor,
            fn_constructor_args=constructor,
            compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
            batch_size=pool.batch_size,
            batch_format="numpy",
            zero_copy_batch=True,
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus or None,
        )

    return stage
