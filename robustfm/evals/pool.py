"""The scoring actor pool: Ray actors that score the blocks of a suite's data set, kept alive across suites.

A recipe's milestone runs several suites (detection, zero-shot, out-of-domain sets, each WiSE-FT mix) on one model.
Each scoring actor is a process that imports torch and open_clip and builds the model: ~8 s of CPU on a laptop core,
more than the tiny evaluations themselves. So the pool is not tied to one suite: inside :func:`scoring_session`
every suite with the same pool settings is scored by the same actors, each of which builds a suite's scorer on its
first block of that suite and keeps the model while the next suite evaluates the same one. Outside a session a
suite gets a pool of its own, stopped when it ends.

How work flows: the driver streams the suite's Ray Data set as block references (the rows stay in the object store,
where the reading tasks put them), hands each block to an actor with a free slot (``slots_per_actor`` in flight per
actor, so that an actor that started late is not left idle while another holds a backlog), and collects the scored
columns. The pool starts ``min_actors`` actors, waits up to ``wait_for_min_actors_s`` for them, and adds actors up to
``max_actors`` while every ready actor is busy and blocks are waiting.

Faults: actors are created with unlimited restarts and their calls retried (``max_task_retries``): an actor whose
process dies, or whose node goes away, is restarted (on another node if need be) and the blocks it held are scored
again by the new process; a block is counted once, when its call returns. A scorer that raises fails the suite.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from robustfm.config.core import to_dict
from robustfm.evals.config import ActorPoolConfig
from robustfm.evals.model_ref import ModelRef

SLOTS_PER_ACTOR = 2
"""Blocks in flight per actor: one scoring, one waiting."""
MAX_CALL_RETRIES = 10
"""Retries of one block after its actor died (a crash loop fails the suite instead of hanging it)."""


@dataclass(frozen=True)
class ScorerSpec:
    """Everything an actor needs to build one suite's scorer (sent once per suite through the object store)."""

    key: str
    scorer: type
    model_ref: ModelRef
    params: dict[str, Any]
    seed: int
    crash_once_marker: str | None
    gradient_precision: str

    def model_key(self) -> tuple[Any, ...]:
        module = self.model_ref.module_ref.hex() if self.model_ref.module_ref is not None else None
        return (self.model_ref.name, self.model_ref.pretrained, module, self.seed)


class ScoringHost:
    """One actor of the pool: builds scorers on demand, shares one model among the suites that evaluate it."""

    def __init__(self, threads: int, device: str) -> None:
        import torch

        torch.set_num_threads(threads)
        self.device = device
        self._model_key: tuple[Any, ...] | None = None
        self._model: Any = None
        self._scorers: dict[str, Any] = {}

    def ready(self) -> bool:
        return True

    def score_block(self, spec: ScorerSpec, block: Any, start: int, end: int, batch_size: int) -> dict[str, Any]:
        """Score rows ``start:end`` of ``block`` in batches of ``batch_size``; the output columns of all batches."""
        from ray.data.block import BlockAccessor

        scorer = self._scorer(spec)
        accessor = BlockAccessor.for_block(block)
        outputs = []
        for first in range(start, end, batch_size):
            piece = BlockAccessor.for_block(accessor.slice(first, min(first + batch_size, end), copy=False))
            outputs.append(scorer(piece.to_batch_format("numpy")))
        return {key: np.concatenate([out[key] for out in outputs]) for key in outputs[0]} if outputs else {}

    def _scorer(self, spec: ScorerSpec) -> Any:
        if spec.key in self._scorers:
            return self._scorers[spec.key]
        if spec.model_key() != self._model_key:
            import torch

            self._scorers.clear()  # scorers of the previous model go with it: one model in memory per actor
            self._model = None
            # A randomly initialized model (no weights) must be the same network in every actor of the pool.
            torch.manual_seed(spec.seed)
            self._model = spec.model_ref.load().to(self.device).eval()
            self._model_key = spec.model_key()
        self._scorers[spec.key] = spec.scorer(
            spec.model_ref,
            spec.params,
            spec.seed,
            device=self.device,
            crash_once_marker=spec.crash_once_marker,
            gradient_precision=spec.gradient_precision,
            model=self._model,
        )
        return self._scorers[spec.key]


class ScoringPool:
    """Actors of one pool configuration; :meth:`score` runs one suite's data set on them."""

    def __init__(self, config: ActorPoolConfig) -> None:
        import ray

        self.config = config
        self._actor_class = ray.remote(ScoringHost).options(
            num_cpus=config.num_cpus,
            num_gpus=config.num_gpus,
            resources=dict(config.resources) or None,
            scheduling_strategy="SPREAD",
            max_restarts=-1,
            max_task_retries=MAX_CALL_RETRIES,
        )
        self._actors: list[Any] = []
        self._ready: list[Any] = []
        self._starting: dict[Any, Any] = {}  # ready() ref -> actor
        for _ in range(config.min_actors):
            self._add_actor()
        self._wait_for_min_actors()

    def _add_actor(self) -> None:
        device = "cuda" if self.config.num_gpus > 0 else "cpu"
        actor = self._actor_class.remote(self.config.threads, device)
        self._actors.append(actor)
        self._starting[actor.ready.remote()] = actor

    def _collect_started(self, block: bool) -> None:
        """Move started actors to the ready list; with ``block``, wait for at least one."""
        import ray

        if not self._starting:
            return
        refs = list(self._starting)
        done, _ = ray.wait(refs, num_returns=1 if block else len(refs), timeout=None if block else 0)
        for ref in done:
            ray.get(ref)  # an actor whose constructor failed raises here, with its error
            self._ready.append(self._starting.pop(ref))

    def _wait_for_min_actors(self) -> None:
        import ray

        wait_s = self.config.wait_for_min_actors_s
        if wait_s <= 0:
            return
        done, pending = ray.wait(list(self._starting), num_returns=len(self._starting), timeout=wait_s)
        for ref in done:
            ray.get(ref)
            self._ready.append(self._starting.pop(ref))
        if pending:
            self.shutdown()
            raise TimeoutError(
                f"only {len(done)} of eval.pool.min_actors={self.config.min_actors} scoring actors started within "
                f"eval.pool.wait_for_min_actors_s={wait_s}: the cluster lacks the resources one actor asks for "
                f"(num_cpus={self.config.num_cpus}, num_gpus={self.config.num_gpus}, "
                f"resources={dict(self.config.resources)})"
            )

    def score(self, dataset: Any, spec: ScorerSpec) -> list[dict[str, Any]]:
        """Score every block of ``dataset``; the output columns of each block (in completion order)."""
        import ray

        spec_ref = ray.put(spec)
        blocks = _block_slices(dataset)
        in_flight: dict[Any, Any] = {}  # result ref -> actor
        load = {actor: 0 for actor in self._actors}
        results: list[dict[str, Any]] = []
        exhausted = False
        while not exhausted or in_flight:
            self._collect_started(block=not (in_flight or self._ready))
            free = [actor for actor in self._ready if load.setdefault(actor, 0) < SLOTS_PER_ACTOR]
            while free and not exhausted:
                item = next(blocks, None)
                if item is None:
                    exhausted = True
                    break
                actor = min(free, key=load.__getitem__)
                ref = actor.score_block.remote(spec_ref, *item, self.config.batch_size)
                in_flight[ref] = actor
                load[actor] += 1
                free = [a for a in free if load[a] < SLOTS_PER_ACTOR]
            if not exhausted and not free and not self._starting and len(self._actors) < self.config.max_actors:
                self._add_actor()  # every ready actor is busy and blocks are waiting: grow the pool
            if not in_flight:
                continue
            waiting = list(in_flight) + list(self._starting)
            done, _ = ray.wait(waiting, num_returns=1, timeout=None)
            for ref in done:
                if ref in in_flight:
                    actor = in_flight.pop(ref)
                    load[actor] -= 1
                    out = ray.get(ref)
                    if out:
                        results.append(out)
        return results

    def actor_count(self) -> int:
        return len(self._actors)

    def shutdown(self) -> None:
        import ray

        for actor in self._actors:
            ray.kill(actor)
        self._actors, self._ready, self._starting = [], [], {}


def _block_slices(dataset: Any) -> Iterator[tuple[Any, int, int]]:
    """``(block ref, start, end)`` of every non-empty block slice of the data set, streamed as it executes."""
    for bundle in dataset.iter_internal_ref_bundles():
        for entry, block_slice in zip(bundle.blocks, bundle.slices, strict=True):
            if block_slice is not None:
                start, end = block_slice.start_offset, block_slice.end_offset
            else:
                start, end = 0, entry.metadata.num_rows
            if end is None:
                raise RuntimeError("a block of the evaluation data set has no row count in its metadata")
            if end > start:
                yield entry.ref, start, end


# --- sessions: one pool per configuration, shared by every suite run inside ------------------------------------------

_SESSION: contextvars.ContextVar[dict[str, ScoringPool] | None] = contextvars.ContextVar("scoring_session")


def _pool_key(config: ActorPoolConfig) -> str:
    return json.dumps(to_dict(config), sort_keys=True, default=str)


@contextlib.contextmanager
def scoring_session() -> Iterator[None]:
    """Share scoring actors among the suites run inside (e.g. all evaluations of one milestone); stop them after.

    Nested sessions use the outer one. Actors hold their CPUs (and GPUs) while the session lasts: close it before
    training takes the cluster again.
    """
    if _SESSION.get(None) is not None:
        yield
        return
    pools: dict[str, ScoringPool] = {}
    token = _SESSION.set(pools)
    try:
        yield
    finally:
        _SESSION.reset(token)
        for pool in pools.values():
            pool.shutdown()


@contextlib.contextmanager
def pool_for(config: ActorPoolConfig) -> Iterator[ScoringPool]:
    """The session's pool of this configuration (started on first use), or a pool of its own outside a session."""
    pools = _SESSION.get(None)
    if pools is None:
        pool = ScoringPool(config)
        try:
            yield pool
        finally:
            pool.shutdown()
        return
    key = _pool_key(config)
    if key not in pools:
        pools[key] = ScoringPool(config)
    yield pools[key]


def new_spec(
    scorer: type, model_ref: ModelRef, params: dict[str, Any], seed: int, crash_once_marker: str | None, precision: str
) -> ScorerSpec:
    """A scorer spec with a key of its own: every suite run builds fresh scorers in the actors."""
    return ScorerSpec(uuid.uuid4().hex, scorer, model_ref, params, seed, crash_once_marker, precision)
