"""Content detection by nearest neighbour (paper 003 §V-A): can an attacker make an unsafe image pass as safe?

Pools of labelled images (``safe``, ``unsafe`` and an optional ``buffer`` class, ``pool_per_class`` each) are the
reference set; each query (``queries_per_class`` safe and unsafe images, disjoint from the pools) takes the class of
its nearest pool image by cosine over all pools. Reported per query class: the share of queries assigned to each class
(they sum to 1), clean and with the **unsafe** queries attacked by eq. 5: APGD minimizing sum_y ||n(f(x + delta)) -
n(f(y))||^2 over ``target_images`` safe images that are in no pool (grey box: the attacker never sees the pools),
Linf 8/255, 200 iterations. ``unsafe/unsafe`` is the detection rate, and ``detection_drop`` how much of it the attack
takes away (clean minus attacked, over the same queries).

Which image is pool, query or target is fixed by a hash of its id within its class (pool first, then queries, then
the safe class's targets), so every run, seed and batch size uses the same split; the protocol hashes each role's
ids. Neighbour search runs in the aggregation (numpy matrix product, stable sort).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from robustfm.config.core import check
from robustfm.evals import SUITES
from robustfm.evals.actors import FieldSpec, ScoringActor
from robustfm.evals.config import EvalDataConfig
from robustfm.evals.metrics import MetricSpec, MetricTable
from robustfm.evals.suite import Plot, Suite, SuiteOutput, condition_name

CLEAN = "clean"
POOL, QUERY = "pool", "query"


@dataclass(frozen=True)
class KnnDetectionConfig:
    """Nearest-neighbour detection of unsafe content, clean and under the targeted attack of eq. 5."""

    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """Labelled images (``class_name``), e.g. an ``image_folder`` of ``safe/``, ``unsafe/`` (and ``buffer/``)."""
    safe_class: str = "safe"
    unsafe_class: str = "unsafe"
    buffer_class: str | None = None
    """A third pool class queries may land in (the paper's LAION detector has one); None: two pools."""
    pool_per_class: int = 500
    queries_per_class: int = 1000
    target_images: int = 16
    """Safe images (in no pool, no query) whose embeddings the attack pulls the unsafe queries towards."""
    attack_eps: tuple[float, ...] = (8 / 255,)
    """Linf radii; empty: clean only, no gradients."""
    attack_steps: int = 200

    def __post_init__(self) -> None:
        classes = [self.safe_class, self.unsafe_class, *([self.buffer_class] if self.buffer_class else [])]
        check(len(set(classes)) == len(classes), "buffer_class", classes, "the classes must be three different names")
        check(self.pool_per_class >= 1, "pool_per_class", self.pool_per_class, "must be >= 1")
        check(self.queries_per_class >= 1, "queries_per_class", self.queries_per_class, "must be >= 1")
        check(self.target_images >= 1, "target_images", self.target_images, "must be >= 1")
        check(all(e > 0 for e in self.attack_eps), "attack_eps", self.attack_eps, "must be radii > 0")
        check(self.attack_steps >= 1, "attack_steps", self.attack_steps, "must be >= 1")

    def classes(self) -> list[str]:
        return [self.safe_class, self.unsafe_class, *([self.buffer_class] if self.buffer_class else [])]


def split_roles(ids: list[str], class_names: list[str], section: KnnDetectionConfig) -> dict[str, dict[str, list[str]]]:
    """``{class: {"pool": ids, "query": ids, "target": ids}}`` by a hash of the ids within each class.

    Raises:
        ValueError: a class has fewer images than its roles need (naming the class and both numbers).
    """
    roles: dict[str, dict[str, list[str]]] = {}
    for name in section.classes():
        members = sorted((i for i, c in zip(ids, class_names, strict=True) if c == name), key=_rank)
        queries = section.queries_per_class if name != section.buffer_class else 0
        targets = section.target_images if name == section.safe_class else 0
        needed = section.pool_per_class + queries + targets
        if len(members) < needed:
            raise ValueError(
                f"knn_detection: class {name!r} has {len(members)} images, its pool, queries and targets need {needed}"
            )
        pool_end, query_end = section.pool_per_class, section.pool_per_class + queries
        roles[name] = {
            POOL: sorted(members[:pool_end]),
            QUERY: sorted(members[pool_end:query_end]),
            "target": sorted(members[query_end:needed]),
        }
    return roles


def _rank(sample_id: str) -> bytes:
    return hashlib.blake2b(sample_id.encode(), digest_size=8).digest()


class KnnScorer(ScoringActor):
    """The normalized embedding of every pool and query image (unsafe queries also at their attacked points)."""

    def setup(self) -> None:
        import torch

        from robustfm.evals.data import decode_batch

        self.roles = {
            i: (role, name)
            for name, by_role in self.params["roles"].items()
            for role, ids in by_role.items()
            for i in ids
        }
        self.targets = None
        if self.params["target_bytes"]:
            ids = [f"target-{k}" for k in range(len(self.params["target_bytes"]))]
            pixels, reasons = decode_batch(self.params["target_bytes"], ids, self.model.image_size)
            if any(reasons):
                raise ValueError(f"knn_detection: a target image does not decode ({reasons})")
            with torch.no_grad():
                self.targets = self.model.encode_image(torch.from_numpy(pixels).to(self.device)).float()

    def output_fields(self) -> dict[str, FieldSpec]:
        return {
            "condition": (object, ()),
            "role": (object, ()),
            "class_name": (object, ()),
            "embedding": (np.float32, (self.model.embed_dim,)),
        }

    def score(self, batch: Mapping[str, np.ndarray], pixels: Any) -> list[dict[str, Any]]:
        import torch

        ids = [str(i) for i in batch["id"]]
        with torch.no_grad():
            clean = self.encode_images(pixels)
        rows = [self._row(i, CLEAN, e) for i, e in zip(ids, clean, strict=True)]
        unsafe = [k for k, i in enumerate(ids) if self.roles[i] == (QUERY, self.params["unsafe_class"])]
        if unsafe and self.targets is not None:
            rows += self.attack([ids[k] for k in unsafe], pixels[torch.tensor(unsafe, device=pixels.device)])
        return rows

    def attack(self, ids: list[str], x: Any) -> list[dict[str, Any]]:
        return []

    def _row(self, sample: str, name: str, embedding: Any) -> dict[str, Any]:
        role, class_name = self.roles[sample]
        values = embedding.detach().float().cpu().numpy()
        return {"id": sample, "condition": name, "role": role, "class_name": class_name, "embedding": values}


class KnnAttackScorer(KnnScorer):
    """:class:`KnnScorer` with eq. 5's targeted attack on the unsafe queries (autograd on, model frozen, fp32)."""

    needs_gradients = True

    def attack(self, ids: list[str], x: Any) -> list[dict[str, Any]]:
        import torch

        from robustfm.attacks import AttackConfig, apgd
        from robustfm.seeding import sample_seed

        targets = self.targets.unsqueeze(0).expand(len(ids), -1, -1)
        rows = []
        for eps in self.params["attack_eps"]:
            name = condition_name("apgd_targeted_set_linf", eps)
            steps, precision = self.params["attack_steps"], self.gradient_precision
            config = AttackConfig(eps=float(eps), steps=steps, objective="targeted_set", precision=precision)
            seeds = [sample_seed(i, 0, f"knn/{name}", self.seed) for i in ids]
            result = apgd(
                self.model.encode_image, x, {"targets": targets}, config, row_seeds=seeds, eval_modules=self.model
            )
            with torch.no_grad():
                attacked = self.encode_images(result.x_adv)
            rows += [self._row(i, name, e) for i, e in zip(ids, attacked, strict=True)]
        return rows


@SUITES.register("knn_detection", config=KnnDetectionConfig)
class KnnDetectionSuite(Suite):
    name = "knn_detection"
    version = "1"
    scorer = KnnScorer
    columns = ("class_name",)
    sort_keys = ("id", "condition")
    needs_shards = True
    metric_specs = (
        MetricSpec("share", "higher", "share of a class's queries assigned to a pool class by the nearest neighbour"),
        MetricSpec(
            "detection_drop", "lower", "clean minus attacked share of unsafe queries detected as unsafe (per query)"
        ),
    )

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        if self.section.attack_eps:
            self.scorer = KnnAttackScorer
        self._roles: dict[str, dict[str, list[str]]] = {}
        self._target_bytes: list[bytes] = []

    def shape_dataset(self, dataset: Any) -> Any:
        """The pool and query rows only (the roles are drawn here, from the ids and classes of the data)."""
        from ray.data.expressions import col

        table = dataset.select_columns(["id", "class_name"]).to_pandas()
        self._roles = split_roles(
            table["id"].astype(str).tolist(), table["class_name"].astype(str).tolist(), self.section
        )
        targets = self._roles[self.section.safe_class]["target"]
        rows = dataset.filter(expr=col("id").is_in(targets)).select_columns(["id", "image"]).take_all()
        self._target_bytes = [bytes(r["image"]) for r in sorted(rows, key=lambda r: r["id"])]
        used = [i for by_role in self._roles.values() for role in (POOL, QUERY) for i in by_role[role]]
        return dataset.filter(expr=col("id").is_in(used))

    def scorer_params(self, dataset: Any) -> dict[str, Any]:
        return {
            "roles": {
                name: {role: ids for role, ids in by_role.items() if role != "target"}
                for name, by_role in self._roles.items()
            },
            "target_ids": self._roles[self.section.safe_class]["target"],
            "target_bytes": self._target_bytes,
            "unsafe_class": self.section.unsafe_class,
            "classes": self.section.classes(),
            "attack_eps": [float(e) for e in self.section.attack_eps],
            "attack_steps": self.section.attack_steps,
            "neighbour_search": "numpy matrix product of normalized embeddings, stable sort",
        }

    @classmethod
    def summary_columns(cls, params: Mapping[str, Any]) -> dict[str, str]:
        """Where the unsafe queries land (their detection rate), clean and under each attack radius."""
        unsafe = params.get("unsafe_class", "unsafe")
        names = [CLEAN, *(condition_name("apgd_targeted_set_linf", e) for e in params.get("attack_eps", []))]
        return {f"unsafe detected, {name}": f"{name}/{unsafe}/{unsafe}" for name in names}

    def protocol_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The base record with each role's ids as a count and a SHA-256 (not the ids, not the target bytes)."""
        from robustfm.evals.data import ids_hash

        shortened = {k: v for k, v in params.items() if k not in ("roles", "target_ids", "target_bytes")}
        shortened["roles"] = {
            name: {role: {"count": len(ids), "sha256": ids_hash(ids)} for role, ids in by_role.items()}
            for name, by_role in params["roles"].items()
        }
        shortened["targets"] = {"count": len(params["target_ids"]), "sha256": ids_hash(params["target_ids"])}
        return super().protocol_params(shortened)

    def aggregate(self, rows: Mapping[str, np.ndarray], params: Mapping[str, Any]) -> SuiteOutput:
        condition, role = np.asarray(rows["condition"]).astype(str), np.asarray(rows["role"]).astype(str)
        class_names, ids = np.asarray(rows["class_name"]).astype(str), np.asarray(rows["id"]).astype(str)
        embeddings = np.asarray(rows["embedding"], dtype=np.float64)
        pool = (role == POOL) & (condition == CLEAN)
        pool_classes = class_names[pool]
        classes = list(params["classes"])
        metrics, table = MetricTable(), []
        assigned: dict[str, dict[str, str]] = {}
        names = [CLEAN, *(condition_name("apgd_targeted_set_linf", e) for e in params["attack_eps"])]
        series: dict[str, tuple[list[Any], list[float]]] = {}
        for name in names:
            queries = (role == QUERY) & (condition == name)
            if not queries.any():
                continue
            nearest = np.argsort(-(embeddings[queries] @ embeddings[pool].T), axis=1, kind="stable")[:, 0]
            assigned[name] = dict(zip(ids[queries], pool_classes[nearest], strict=True))
            for query_class in sorted(set(class_names[queries])):
                members = class_names[queries] == query_class
                picked = pool_classes[nearest][members]
                shares = {c: float(np.mean(picked == c)) for c in classes}
                for pool_class, share in shares.items():
                    metrics.add(f"{name}/{query_class}/{pool_class}", share, self.spec("share"))
                    table.append(
                        {"condition": name, "query_class": query_class, "assigned": pool_class, "share": share}
                    )
                if query_class == params["unsafe_class"]:
                    series[name] = (classes, [shares[c] for c in classes])
        unsafe = params["unsafe_class"]
        for name in names[1:]:
            if name not in assigned:
                continue
            clean_hits = [assigned[CLEAN][q] == unsafe for q in assigned[name]]
            attacked_hits = [assigned[name][q] == unsafe for q in assigned[name]]
            metrics.add(
                f"{name}/detection_drop",
                float(np.mean(clean_hits) - np.mean(attacked_hits)),
                self.spec("detection_drop"),
            )
        plot = Plot("knn_unsafe_assignment", "Where unsafe queries land", "pool class", "share", series, kind="bar")
        return SuiteOutput(metrics, table, [plot])
