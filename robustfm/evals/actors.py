"""The base of every suite's scorer: a callable class that holds the model and scores one batch of rows.

The actors of the scoring pool (:mod:`robustfm.evals.pool`) build one scorer per suite, with the model built once
per actor, and call it with numpy batches of shard rows. The output schema of a suite is fixed
(:meth:`ScoringActor.output_fields`), and rows whose image cannot be decoded come back as placeholder rows with
``status`` set to the skip reason, so that the driver counts them exactly.

Most scorers only embed images and run under ``torch.inference_mode``. A scorer that differentiates through the
model (an attack, a relevance map) declares :attr:`ScoringActor.needs_gradients`: it runs without inference mode
(tensors made under it can never enter autograd), with the model in eval mode and its parameters frozen (gradients
reach the inputs only), in fp32 unless the pool asks for bf16 autocast.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import numpy as np

from robustfm.evals.data import decode_batch
from robustfm.evals.model_ref import ModelRef

STATUS_OK = "ok"
# (numpy dtype, per-row shape) of an output column; strings use dtype object.
FieldSpec = tuple[Any, tuple[int, ...]]


def build_scoring_model(model_ref: ModelRef, seed: int, device: str) -> Any:
    """The model ``model_ref`` names on ``device``, in eval mode; seeded first, because a randomly initialized model
    (no weights) must be the same network in every actor of a pool."""
    import torch

    torch.manual_seed(seed)
    return model_ref.load().to(torch.device(device)).eval()


class ScoringActor(ABC):
    """Loads the model once, then turns batches of shard rows into scored rows.

    Args:
        model_ref: the model to build.
        params: the suite's scorer parameters (prompts, corruption names, class names...), plain data.
        seed: run seed of per-sample draws.
        threads: ``torch.set_num_threads`` for this actor (1 per reserved CPU keeps actors from oversubscribing).
        device: ``cpu`` or ``cuda``.
        crash_once_marker: fault injection for tests: the first actor to find this path absent creates it and kills
            its own process (``os._exit``) on its first batch, so Ray must restart it and retry the batch.
        gradient_precision: for scorers that need gradients: ``fp32`` (default) or ``bf16`` autocast around
            :meth:`score` (the model's weights stay fp32).
        model: the model ``model_ref`` names, already built on ``device`` (a pool actor shares one among the suites
            that evaluate it, see :mod:`robustfm.evals.pool`); None: build it here (and set ``threads``).
    """

    needs_gradients: ClassVar[bool] = False
    """True for scorers that differentiate through the model (attacks, relevance maps); see the module docstring."""
    keeps_encoded_image: ClassVar[bool] = False
    """True for scorers that read the encoded ``image`` bytes themselves (e.g. its stored size, to check a mask
    against it); otherwise :meth:`score` gets the batch without them (the decoded pixels carry the image)."""

    def __init__(
        self,
        model_ref: ModelRef,
        params: Mapping[str, Any],
        seed: int,
        threads: int = 1,
        device: str = "cpu",
        crash_once_marker: str | None = None,
        gradient_precision: Literal["fp32", "bf16"] = "fp32",
        model: Any = None,
    ) -> None:
        import torch

        self.device = torch.device(device)
        if model is None:
            torch.set_num_threads(threads)
            model = build_scoring_model(model_ref, seed, device)
        self.model = model
        if self.needs_gradients:
            self.model.float()
            for parameter in self.model.parameters():
                parameter.requires_grad_(False)
        self.gradient_precision = gradient_precision
        self.params = dict(params)
        self.seed = seed
        self.crash_once_marker = crash_once_marker
        with self._scoring_mode():
            self.setup()
        self._fields = {"id": (object, ()), "status": (object, ()), "actor_pid": (np.int64, ()), **self.output_fields()}

    def setup(self) -> None:  # noqa: B027  (optional hook: most scorers need no per-actor preparation)
        """Work done once per actor after the model is built (e.g. text embeddings of prompts)."""

    @abstractmethod
    def output_fields(self) -> dict[str, FieldSpec]:
        """The suite's output columns besides ``id`` and ``status``: name -> (dtype, per-row shape)."""

    @abstractmethod
    def score(self, batch: Mapping[str, np.ndarray], pixels: Any) -> list[dict[str, Any]]:
        """Score the decodable rows of a batch.

        Args:
            batch: the batch's columns, restricted to the decodable rows, in order.
            pixels: float32 tensor [n, 3, S, S] in [0, 1] on the actor's device, one per row of ``batch``.

        Returns:
            Output rows (each with ``id`` and every field of :meth:`output_fields`; ``status`` defaults to ok).
        """

    def _maybe_crash(self) -> None:
        if self.crash_once_marker is None:
            return
        try:
            # O_EXCL makes exactly one actor, once, the victim, even with several actors racing.
            os.close(os.open(self.crash_once_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os._exit(1)

    def _scoring_mode(self) -> contextlib.AbstractContextManager:
        """Inference mode for embedding scorers; for gradient scorers autograd stays on (bf16 autocast if asked)."""
        import torch

        if not self.needs_gradients:
            return torch.inference_mode()
        if self.gradient_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def encode_images(self, pixels: Any) -> Any:
        """L2-normalized float32 image embeddings of a pixel batch."""
        return self.model.encode_image(pixels, normalize=True).float()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        self._maybe_crash()
        ids = [str(i) for i in batch["id"]]
        pixels, reasons = decode_batch(batch["image"], ids, self.model.image_size)
        good = [i for i, reason in enumerate(reasons) if reason is None]
        rows: list[dict[str, Any]] = []
        if good:
            kept = [key for key in batch if key != "image" or self.keeps_encoded_image]
            subset = {key: np.asarray(batch[key])[good] for key in kept}
            subset["id"] = np.asarray([ids[i] for i in good], dtype=object)
            with self._scoring_mode():
                rows = self.score(subset, torch.from_numpy(pixels).to(self.device))
        rows.extend({"id": ids[i], "status": reason} for i, reason in enumerate(reasons) if reason is not None)
        for row in rows:
            row["actor_pid"] = os.getpid()  # which actor scored the row: shows how work spread over the pool
        return self._columns(rows)

    def _columns(self, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        columns: dict[str, np.ndarray] = {}
        for name, (dtype, shape) in self._fields.items():
            if dtype is object:
                default = STATUS_OK if name == "status" else ""
                columns[name] = np.asarray([row.get(name, default) for row in rows] or [], dtype=object)
            else:
                values = np.zeros((len(rows), *shape), dtype=dtype)
                for index, row in enumerate(rows):
                    if name in row:
                        values[index] = row[name]
                columns[name] = values
        return columns
