"""Class logits of any evaluated model over a suite's label space: CLIP by its prompt ensemble, classifiers by their
own head. Used inside scoring actors (imports torch).

- CLIP (``ClipModel``): a class's text embedding is the renormalized mean of its normalized template embeddings
  (CLIP's prompt ensemble); logits are ``logit_scale.exp()`` x the cosine of the image embedding with each class
  (the softmax is then CLIP's own, as RobustVLM's and paper 002's zero-shot classifiers take it). Class ``i`` is
  ``class_names[i]``.
- Classifiers (``TimmClassifier``): the model's logits over its whole head; a data label is the head's output of that
  index (the data's labels must then be the head's indices), and a prediction may be any of the head's classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F


def class_text_embeddings(
    model: Any, class_names: Sequence[str], templates: Sequence[str], batch_size: int = 1024
) -> torch.Tensor:
    """``(C, E)`` unit text embeddings, one per class: the renormalized mean of its templates' embeddings. Prompts are
    encoded in batches of about ``batch_size`` across classes (one class at a time made 1,000 classes 5x slower)."""
    per_batch = max(1, batch_size // max(1, len(templates)))
    embeddings = []
    for start in range(0, len(class_names), per_batch):
        chunk = class_names[start : start + per_batch]
        texts = [template.format(name) for name in chunk for template in templates]
        encoded = model.encode_text(texts, normalize=True).float().view(len(chunk), len(templates), -1)
        mean = encoded.mean(1)
        embeddings.append(mean / mean.norm(dim=-1, keepdim=True))
    return torch.cat(embeddings)


def is_clip(model: Any) -> bool:
    """True for a CLIP model (it has a text tower to build class embeddings from)."""
    return hasattr(model, "encode_text")


class ClassLogits:
    """``forward(pixels) -> outputs`` and ``logits(outputs) -> (M, C)`` of one model over one label space, split so
    that callers can reuse the outputs (embeddings or logits) and so that relevance methods get a per-image score.

    Args:
        model: a ``ClipModel`` or a classifier returning logits.
        class_names: the label space (logit column ``i`` of CLIP is ``class_names[i]``).
        templates: prompt templates with one ``{}`` (CLIP only).
        index_of: data label -> logit column of its class (``robustfm.evals.label_spaces.LabelSpace.index_of``).
        head_indexed: for classifiers, the data's labels are the head's own indices (``index_of`` is then ignored):
            the ``present`` label space of a classifier; False for a named space (``imagenet1k``) whose columns are
            the head's.

    Attributes:
        index_of: data label -> the logit column of its class, checked against the head of a classifier.
    """

    def __init__(
        self,
        model: Any,
        class_names: Sequence[str],
        templates: Sequence[str],
        index_of: Mapping[int, int],
        *,
        head_indexed: bool = True,
    ) -> None:
        self.model = model
        self.clip = is_clip(model)
        if self.clip:
            self.index_of = {int(label): int(index) for label, index in index_of.items()}
            with torch.no_grad():
                self.text = class_text_embeddings(model, class_names, templates)
                self.scale = float(model.logit_scale.detach().float().exp())
            return
        self.index_of = {int(k): int(k if head_indexed else v) for k, v in index_of.items()}
        outputs = int(getattr(model, "num_classes", 0))
        beyond = sorted(label for label, index in self.index_of.items() if not 0 <= index < outputs)
        if beyond:
            raise ValueError(f"labels {beyond[:5]} have no output among the classifier's {outputs}")

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image embeddings (CLIP, not normalized) or logits (classifiers)."""
        return self.model.encode_image(pixels) if self.clip else self.model(pixels)

    def logits(self, outputs: torch.Tensor) -> torch.Tensor:
        """``(M, C)`` float logits from :meth:`forward`'s outputs."""
        if not self.clip:
            return outputs.float()
        return self.scale * F.normalize(outputs.float(), dim=-1) @ self.text.to(outputs.device).T

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.logits(self.forward(pixels))

    def target_score(self, classes: torch.Tensor) -> Any:
        """What ``robustfm.explain`` explains for ``classes`` (N,): CLIP's cosine with each image's class text
        embedding (paper 002's ``s``), or a classifier's class indices (its target logit)."""
        from robustfm.explain.relevance import clip_class_score

        return clip_class_score(self.text, classes) if self.clip else classes
