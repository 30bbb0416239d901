"""Image-to-text and text-to-image retrieval with Recall@K on COCO-style captions (clean images).

Each image contributes its first ``captions_per_image`` captions to the text gallery. Image-to-text: a query image
is a hit at K when any of its own captions is among the K captions most similar to it. Text-to-image: a query
caption is a hit at K when its image is among the K most similar images. Similarity is the cosine of normalized
embeddings; ties are broken by gallery order (stable sort), never at random.
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
from robustfm.evals.metrics import MetricSpec, MetricTable, recall_at_k
from robustfm.evals.suite import Plot, Suite, SuiteOutput

TOO_FEW_CAPTIONS = "too_few_captions"


@dataclass(frozen=True)
class RetrievalConfig:
    """Image-to-text and text-to-image retrieval over COCO-style captions."""

    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """Images with a ``captions`` list column."""
    captions_per_image: int = 5
    """Captions used per image (the first N; COCO has 5). Images with fewer are skipped and counted."""
    ks: tuple[int, ...] = (1, 5, 10)
    """Recall@K cut-offs."""

    def __post_init__(self) -> None:
        check(self.captions_per_image >= 1, "captions_per_image", self.captions_per_image, "must be >= 1")
        check(len(self.ks) > 0 and all(k >= 1 for k in self.ks), "ks", self.ks, "must be positive integers")


class RetrievalScorer(ScoringActor):
    """Normalized embeddings of each image and of its first N captions."""

    def output_fields(self) -> dict[str, FieldSpec]:
        count, dim = self.params["captions_per_image"], self.model.embed_dim
        return {"image_embedding": (np.float32, (dim,)), "caption_embeddings": (np.float32, (count, dim))}

    def score(self, batch: Mapping[str, np.ndarray], pixels: Any) -> list[dict[str, Any]]:
        count = self.params["captions_per_image"]
        ids = [str(i) for i in batch["id"]]
        captions = [list(c) if c is not None else [] for c in batch["captions"]]
        image_embeddings = self.encode_images(pixels).cpu().numpy()
        usable = [index for index, texts in enumerate(captions) if len(texts) >= count]
        rows = [{"id": ids[i], "status": TOO_FEW_CAPTIONS} for i in range(len(ids)) if i not in usable]
        if usable:
            texts = [str(text) for i in usable for text in captions[i][:count]]
            text_embeddings = self.model.encode_text(texts, normalize=True).float().cpu().numpy()
            text_embeddings = text_embeddings.reshape(len(usable), count, -1)
            rows += [
                {"id": ids[i], "image_embedding": image_embeddings[i], "caption_embeddings": text_embeddings[j]}
                for j, i in enumerate(usable)
            ]
        return rows


@SUITES.register("retrieval", config=RetrievalConfig)
class RetrievalSuite(Suite):
    name = "retrieval"
    version = "1"
    scorer = RetrievalScorer
    columns = ("captions",)
    metric_specs = (
        MetricSpec("recall_at_k", "higher", "Recall@K: share of queries with a correct item among the K most similar"),
    )

    def scorer_params(self, dataset: Any) -> dict[str, Any]:
        return {"captions_per_image": self.section.captions_per_image, "ks": list(self.section.ks)}

    def aggregate(self, rows: Mapping[str, np.ndarray], params: Mapping[str, Any]) -> SuiteOutput:
        images = np.asarray(rows["image_embedding"], dtype=np.float64)  # [N, E]
        captions = np.asarray(rows["caption_embeddings"], dtype=np.float64)  # [N, K, E]
        n_images, per_image, dim = captions.shape
        texts = captions.reshape(n_images * per_image, dim)
        owner = np.repeat(np.arange(n_images), per_image)  # image index of each caption
        similarity = images @ texts.T  # [N, N*K]
        relevant = owner[None, :] == np.arange(n_images)[:, None]
        image_to_text = recall_at_k(similarity, relevant, params["ks"])
        text_to_image = recall_at_k(similarity.T, relevant.T, params["ks"])
        metrics, table = MetricTable(), []
        for direction, recalls in (("image_to_text", image_to_text), ("text_to_image", text_to_image)):
            for k, value in recalls.items():
                metrics.add(f"{direction}/recall_at_{k}", value, self.spec("recall_at_k"))
                table.append(
                    {
                        "direction": direction,
                        "k": k,
                        "recall": value,
                        "n_queries": n_images if direction == "image_to_text" else n_images * per_image,
                        "gallery": n_images * per_image if direction == "image_to_text" else n_images,
                    }
                )
        plot = Plot(
            "recall_at_k",
            "Retrieval Recall@K",
            "K",
            "recall",
            {
                d: (list(r), list(r.values()))
                for d, r in (("image_to_text", image_to_text), ("text_to_image", text_to_image))
            },
        )
        return SuiteOutput(metrics, table, [plot])
