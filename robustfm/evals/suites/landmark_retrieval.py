"""Landmark retrieval on Revisited Oxford / Paris (paper 003 App. B-F): mAP Medium and Hard, clean and with the
queries under the untargeted attack of eq. 6.

Shards from ``prepare_data`` with source ``revisitop`` (splits ``database`` and ``query``; ids = image names) and the
ground truth file ``gnd_<name>.pkl`` (read with a restricted unpickler). Queries are cropped to their ``bbx`` (the
standard protocol) before the shared eval preprocessing; database images are used whole. Similarity is the cosine of
the model's image embeddings; each query ranks every database image (a stable sort: ties keep database order).

AP is revisitop's, not sklearn's: junk images leave the ranking (positives below them move up), then each positive
adds the trapezoid between the precisions before and at it (:func:`robustfm.evals.metrics.revisited_average_precision`).
Medium: positives = easy + hard, junk = junk; Hard: positives = hard, junk = junk + easy; a query without positives
is left out of the mean. Database images missing from the shards (skipped at conversion) are never retrieved, and the
protocol counts them. Attack (eq. 6): APGD maximizing ||n(f(x + delta)) - n(f(x))||^2 on each query, Linf
``attack_eps``, ``attack_steps`` iterations; neighbour search runs in the aggregation, as a numpy matrix product.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from robustfm.config.core import check
from robustfm.evals import SUITES
from robustfm.evals.actors import FieldSpec, ScoringActor
from robustfm.evals.config import EvalDataConfig
from robustfm.evals.metrics import MetricSpec, MetricTable, revisited_average_precision
from robustfm.evals.suite import Suite, SuiteOutput, condition_name

CLEAN = "clean"
QUERY, DATABASE = "query", "database"
PROTOCOLS = {"medium": (("easy", "hard"), ("junk",)), "hard": (("hard",), ("junk", "easy"))}
"""Protocol -> (ground-truth lists that are positives, lists that are junk)."""


@dataclass(frozen=True)
class LandmarkRetrievalConfig:
    """Revisited Oxford / Paris retrieval, clean and with attacked queries."""

    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """Shards of source ``revisitop`` (``data.split`` is not read: the two splits are named below)."""
    database_split: str = DATABASE
    query_split: str = QUERY
    ground_truth: str | None = None
    """Path (local or ``s3://``) of the ``gnd_<name>.pkl`` the shards were made from; required."""
    attack_eps: tuple[float, ...] = (4 / 255,)
    """Linf radii of the attack on the queries (paper 003: 4/255); empty: clean only, no gradients."""
    attack_steps: int = 100

    def __post_init__(self) -> None:
        check(
            self.data.shards is None or bool(self.ground_truth),
            "ground_truth",
            self.ground_truth,
            "must name the gnd_<name>.pkl the shards were made from",
        )
        check(all(e > 0 for e in self.attack_eps), "attack_eps", self.attack_eps, "must be radii > 0")
        check(self.attack_steps >= 1, "attack_steps", self.attack_steps, "must be >= 1")


class LandmarkScorer(ScoringActor):
    """The normalized embedding of every image; queries also at their attacked points."""

    def output_fields(self) -> dict[str, FieldSpec]:
        return {"condition": (object, ()), "role": (object, ()), "embedding": (np.float32, (self.model.embed_dim,))}

    def score(self, batch: Mapping[str, np.ndarray], pixels: Any) -> list[dict[str, Any]]:
        import torch

        ids, roles = [str(i) for i in batch["id"]], [str(r) for r in batch["class_name"]]
        with torch.no_grad():
            clean = self.encode_images(pixels)
        rows = _rows(ids, roles, CLEAN, clean)
        queries = [i for i, role in enumerate(roles) if role == QUERY]
        if queries and self.params["attack_eps"]:
            rows += self.attack(ids, queries, pixels, clean)
        return rows

    def attack(self, ids: list[str], queries: list[int], pixels: Any, clean: Any) -> list[dict[str, Any]]:
        return []


class LandmarkAttackScorer(LandmarkScorer):
    """:class:`LandmarkScorer` with eq. 6's attack on the queries (autograd on, model frozen, fp32)."""

    needs_gradients = True

    def attack(self, ids: list[str], queries: list[int], pixels: Any, clean: Any) -> list[dict[str, Any]]:
        import torch

        from robustfm.attacks import AttackConfig, apgd
        from robustfm.seeding import sample_seed

        index = torch.tensor(queries, device=pixels.device)
        x, target = pixels[index], {"clean": clean[index]}
        query_ids = [ids[i] for i in queries]
        rows = []
        for eps in self.params["attack_eps"]:
            name = condition_name("apgd_cosine_away_linf", eps)
            steps, precision = self.params["attack_steps"], self.gradient_precision
            config = AttackConfig(eps=float(eps), steps=steps, objective="cosine_away", precision=precision)
            seeds = [sample_seed(i, 0, f"landmark/{name}", self.seed) for i in query_ids]
            result = apgd(self.model.encode_image, x, target, config, row_seeds=seeds, eval_modules=self.model)
            with torch.no_grad():
                attacked = self.encode_images(result.x_adv)
            rows += _rows(query_ids, [QUERY] * len(queries), name, attacked)
        return rows


def _rows(ids: Sequence[str], roles: Sequence[str], name: str, embeddings: Any) -> list[dict[str, Any]]:
    values = embeddings.detach().float().cpu().numpy()
    return [
        {"id": sample, "condition": name, "role": role, "embedding": value}
        for sample, role, value in zip(ids, roles, values, strict=True)
    ]


@dataclass(frozen=True)
class CropToBox:
    """Ray Data row UDF: the query's image cropped to its ``bbx`` (x0, y0, x1, y1 in pixels), re-encoded as PNG."""

    boxes: Mapping[str, Sequence[float]]

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from PIL import Image

        box = self.boxes.get(str(row["id"]))
        if box is None:
            return row
        try:
            image = Image.open(io.BytesIO(row["image"])).convert("RGB")
        except Exception:  # an undecodable query stays as it is: the scorer counts it as skipped
            return row
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        buffer = io.BytesIO()
        image.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))).save(buffer, format="PNG")
        return {**row, "image": buffer.getvalue()}


def read_ground_truth(path: str) -> dict[str, Any]:
    """The ground truth at ``path`` (local or s3), through the restricted unpickler."""
    from robustfm.data.shards import Location, read_bytes
    from robustfm.data.sources_retrieval import read_revisitop_ground_truth

    location = Location(path)
    return read_revisitop_ground_truth(read_bytes(location.filesystem(), location.base), path)


@SUITES.register("landmark_retrieval", config=LandmarkRetrievalConfig)
class LandmarkRetrievalSuite(Suite):
    name = "landmark_retrieval"
    version = "1"
    scorer = LandmarkScorer
    columns = ("class_name",)
    sort_keys = ("id", "condition")
    metric_specs = (
        MetricSpec("map", "higher", "mean over queries of revisitop's AP (junk removed, trapezoid precision)"),
        MetricSpec("missing", "lower", "database images of the ground truth absent from the shards"),
    )

    needs_shards = True

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        if self.section.attack_eps:
            self.scorer = LandmarkAttackScorer

    @functools.cached_property
    def ground_truth(self) -> dict[str, Any]:
        """The ground truth file, read once per suite run (both the query crops and the scorer params need it)."""
        return read_ground_truth(self.section.ground_truth)

    @property
    def data(self) -> EvalDataConfig:
        """The database split of the shards (the queries are added by :meth:`shape_dataset`)."""
        import dataclasses

        return dataclasses.replace(self.section.data, split=self.section.database_split)

    def shape_dataset(self, dataset: Any) -> Any:
        """The database rows and the query rows (cropped to their boxes), one dataset; ``class_name`` = role."""
        from robustfm.data import open_shards

        ground_truth = self.ground_truth
        pairs = zip(ground_truth["qimlist"], ground_truth["gnd"], strict=True)
        boxes = {str(query): [float(v) for v in entry["bbx"]] for query, entry in pairs}
        queries = open_shards(self.data.shards, self.section.query_split, columns=["id", "image", "class_name"])
        return dataset.union(queries.map(CropToBox(boxes)))

    def scorer_params(self, dataset: Any) -> dict[str, Any]:
        ground_truth = self.ground_truth
        keys = ("easy", "hard", "junk")
        lists = [{key: [int(v) for v in np.asarray(g[key]).ravel()] for key in keys} for g in ground_truth["gnd"]]
        return {
            "attack_eps": [float(e) for e in self.section.attack_eps],
            "attack_steps": self.section.attack_steps,
            "imlist": [str(n) for n in ground_truth["imlist"]],
            "qimlist": [str(n) for n in ground_truth["qimlist"]],
            "gnd": lists,
            "query_crop": "bbx",
            "neighbour_search": "numpy matrix product of normalized embeddings, stable sort",
        }

    @classmethod
    def summary_columns(cls, params: Mapping[str, Any]) -> dict[str, str]:
        """mAP Medium and Hard, clean and under each attack radius."""
        names = [CLEAN, *(condition_name("apgd_cosine_away_linf", e) for e in params.get("attack_eps", []))]
        return {f"{protocol} {name}": f"{name}/{protocol}/map" for name in names for protocol in PROTOCOLS}

    def protocol_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The base record without the image lists and ground truth (their sizes and a hash instead)."""
        import hashlib
        import json

        digest = hashlib.sha256(json.dumps([params["imlist"], params["qimlist"], params["gnd"]]).encode()).hexdigest()
        shortened = {k: v for k, v in params.items() if k not in ("imlist", "qimlist", "gnd")}
        shortened["ground_truth"] = {
            "database": len(params["imlist"]),
            "queries": len(params["qimlist"]),
            "sha256": digest,
        }
        return super().protocol_params(shortened)

    def aggregate(self, rows: Mapping[str, np.ndarray], params: Mapping[str, Any]) -> SuiteOutput:
        ids = np.asarray(rows["id"]).astype(str)
        condition, role = np.asarray(rows["condition"]).astype(str), np.asarray(rows["role"]).astype(str)
        embeddings = np.asarray(rows["embedding"], dtype=np.float64)
        database_rows = {i: r for r, i in enumerate(ids) if role[r] == DATABASE and condition[r] == CLEAN}
        present = [n for n in params["imlist"] if n in database_rows]
        database = embeddings[[database_rows[n] for n in present]]  # ground-truth order, missing images left out
        index_of = {n: k for k, n in enumerate(params["imlist"])}
        present_index = np.asarray([index_of[n] for n in present])
        metrics, table = MetricTable(), []
        metrics.add("missing", float(len(params["imlist"]) - len(present)), self.spec("missing"))
        names = [CLEAN, *(condition_name("apgd_cosine_away_linf", e) for e in params["attack_eps"])]
        for name in names:
            query_rows = {i: r for r, i in enumerate(ids) if role[r] == QUERY and condition[r] == name}
            scored = [(q, g) for q, g in zip(params["qimlist"], params["gnd"], strict=True) if q in query_rows]
            if not scored:
                continue
            similarity = embeddings[[query_rows[q] for q, _ in scored]] @ database.T
            rankings = present_index[np.argsort(-similarity, axis=1, kind="stable")]
            for protocol, (positive_keys, junk_keys) in PROTOCOLS.items():
                aps = [
                    revisited_average_precision(
                        ranking, [v for k in positive_keys for v in g[k]], [v for k in junk_keys for v in g[k]]
                    )
                    for ranking, (_, g) in zip(rankings, scored, strict=True)
                ]
                value = float(np.nanmean(aps)) if not np.all(np.isnan(aps)) else float("nan")
                metrics.add(f"{name}/{protocol}/map", value, self.spec("map"))
                table.append(
                    {"condition": name, "protocol": protocol, "map": value, "queries": int(np.sum(~np.isnan(aps)))}
                )
        return SuiteOutput(metrics, table, [])
