"""The scoring actor pool: Ray actors that score the blocks of a suite's data set, kept alive across suites.

A recipe's milestone runs several suites (detection, zero-shot, out-of-domain sets, each WiSE-FT mix) on one model.
Each scoring actor is a process that imports torch and open_clip and builds the model: ~8 s of CPU on a laptop core,
more than the tiny evaluations themselves. So the pool is not tied to one suite: inside :func:`scoring_session`
every suite with the same pool settings is scored by the same actors, each of which builds a suite's scorer on its
first block of that suite and keeps the model while the next suite evaluates the same one. Outside a session a
suite gets a pool of its own, stopped when it ends.

How work flows: the suite's Ray Data set is read to the end first, as block references (the rows stay in the object
store, where the reading tasks put them; reading before scoring means actors holding the cluster's CPUs can never
starve the reads, and a session's idle actors are stopped before a suite reads if they leave no CPU for it). Then the
driver hands each block to an actor with a free slot (``SLOTS_PER_ACTOR`` in flight per actor, so that an actor that
started late is not left idle while another holds a backlog) and collects the scored columns. The pool starts
``min_actors`` actors, waits up to ``wait_for_min_actors_s`` for them, and adds actors up to ``max_actors`` while
blocks are waiting.

Faults: actors are created with unlimited restarts and their calls retried (``max_task_retries``): an actor whose
process dies, or whose node goes away, is restarted (on another node if need be) and the blocks it held are scored
again by the new process; a block is counted once, when its call returns. A scorer that raises fails the suite.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from robustfm.config.core import to_dict
from robustfm.evals.actors import build_scoring_model
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
            self._scorers.clear()  # scorers of the previous model go with it: one model in memory per actor
            self._model = None
            self._model = build_scoring_model(spec.model_ref, spec.seed, self.device)
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
    """Actors of one pool configuration; :meth:`score` runs one suite's blocks on them (starting them if need be)."""

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

    def _add_actor(self) -> None:
        device = "cuda" if self.config.num_gpus > 0 else "cpu"
        actor = self._actor_class.remote(self.config.threads, device)
        self._actors.append(actor)
        self._starting[actor.ready.remote()] = actor

    def _wait_started(self, num_returns: int, timeout: float | None) -> None:
        """Wait (up to ``timeout``) for ``num_returns`` starting actors; move those started to the ready list."""
        import ray

        done, _ = ray.wait(list(self._starting), num_returns=num_returns, timeout=timeout)
        for ref in done:
            ray.get(ref)  # an actor whose constructor failed raises here, with its error
            self._ready.append(self._starting.pop(ref))

    def _collect_started(self, block: bool) -> None:
        """Move started actors to the ready list; with ``block``, wait for at least one."""
        if not self._starting:
            return
        if block:
            self._wait_started(1, None)
        else:
            self._wait_started(len(self._starting), 0)

    def _start(self) -> None:
        """``min_actors`` actors, waited for up to ``wait_for_min_actors_s`` (0: not waited for)."""
        while len(self._actors) < self.config.min_actors:
            self._add_actor()
        wait_s = self.config.wait_for_min_actors_s
        if wait_s <= 0 or not self._starting:
            return
        self._wait_started(len(self._starting), wait_s)
        if self._starting:
            started = len(self._actors) - len(self._starting)
            self.shutdown()
            raise TimeoutError(
                f"only {started} of eval.pool.min_actors={self.config.min_actors} scoring actors started within "
                f"eval.pool.wait_for_min_actors_s={wait_s}: the cluster lacks the resources one actor asks for "
                f"(num_cpus={self.config.num_cpus}, num_gpus={self.config.num_gpus}, "
                f"resources={dict(self.config.resources)})"
            )

    def score(self, blocks: list[tuple[Any, int, int]], spec: ScorerSpec) -> list[dict[str, Any]]:
        """Score ``blocks`` (``(block ref, start, end)``, see :func:`read_blocks`); the output columns of each."""
        import ray

        self._start()
        spec_ref = ray.put(spec)
        waiting = list(reversed(blocks))
        in_flight: dict[Any, Any] = {}  # result ref -> actor
        load: dict[Any, int] = {}
        results: list[dict[str, Any]] = []
        while waiting or in_flight:
            self._collect_started(block=not (in_flight or self._ready))
            for actor in sorted(self._ready, key=lambda a: load.get(a, 0)):
                while waiting and load.get(actor, 0) < SLOTS_PER_ACTOR:
                    ref = actor.score_block.remote(spec_ref, *waiting.pop(), self.config.batch_size)
                    in_flight[ref] = actor
                    load[actor] = load.get(actor, 0) + 1
            if waiting and not self._starting and len(self._actors) < self.config.max_actors:
                self._add_actor()  # every ready actor is busy and blocks are waiting: grow the pool
            if not in_flight:
                continue
            done, _ = ray.wait([*in_flight, *self._starting], num_returns=1)
            for ref in done:
                if ref in in_flight:
                    load[in_flight.pop(ref)] -= 1
                    out = ray.get(ref)
                    if out:
                        results.append(out)
        return results

    def holds_actors(self) -> bool:
        return bool(self._actors)

    def shutdown(self) -> None:
        import ray

        for actor in self._actors:
            ray.kill(actor)
        self._actors, self._ready, self._starting = [], [], {}


def read_blocks(dataset: Any) -> list[tuple[Any, int, int]]:
    """Run the data set's reading and shaping to the end: ``(block ref, start, end)`` of every non-empty block slice.

    The rows stay in the object store (the driver holds references only). Reading ends before scoring starts, so
    that actors which take the cluster's last CPUs can never starve the reads they wait for.
    """
    blocks = []
    for bundle in dataset.iter_internal_ref_bundles():
        for entry, block_slice in zip(bundle.blocks, bundle.slices, strict=True):
            if block_slice is not None:
                start, end = block_slice.start_offset, block_slice.end_offset
            else:
                start, end = 0, entry.metadata.num_rows
            if end is None:
                raise RuntimeError("a block of the evaluation data set has no row count in its metadata")
            if end > start:
                blocks.append((entry.ref, start, end))
    return blocks


# --- sessions: one pool per configuration, shared by every suite run inside ------------------------------------------

_SESSION: contextvars.ContextVar[dict[str, ScoringPool] | None] = contextvars.ContextVar("scoring_session")
READ_CPUS = 1.0
"""What a Ray Data read task asks for: the CPUs a session's idle actors must leave free before a suite reads."""
RELEASE_WAIT_S = 30.0


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


def make_room_for_reading() -> None:
    """Stop the session's idle actors when they leave the cluster less than a read task's CPU (a pool as large as
    the cluster): the next suite's reads would otherwise wait for them forever. The pool restarts when it scores."""
    import ray

    pools = [pool for pool in (_SESSION.get(None) or {}).values() if pool.holds_actors()]
    if not pools or ray.available_resources().get("CPU", 0.0) >= READ_CPUS:
        return
    for pool in pools:
        pool.shutdown()
    deadline = time.monotonic() + RELEASE_WAIT_S  # Ray frees a killed actor's CPUs asynchronously
    while ray.available_resources().get("CPU", 0.0) < READ_CPUS and time.monotonic() < deadline:
        time.sleep(0.2)


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
