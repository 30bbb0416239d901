"""Which model a suite evaluates: a picklable reference that each scoring actor turns into a model.

Evaluation reads a checkpoint or exported weights, never a live trainer. The ``--model`` syntax of
``jobs/evaluate.py`` (and of :func:`parse_model_ref`):

==========================================  ===========================================================================
``open_clip/tiny-vit``                      a registered name, random init (tests, smoke runs)
``open_clip/ViT-B-32@openai``               a registered name with a pretrained tag (needs the hub or its cache)
``open_clip/ViT-B-32@/ckpt/model.safetensors``  a registered architecture with local weights (safetensors or torch file)
``/runs/x/export/model.safetensors``        exported weights; the architecture is read from the file's metadata
                                            (``model_name``, or ``format`` + ``arch`` as ``robustfm.models.export``
                                            writes them) or a ``resolved_config.yaml`` beside it or one level up
``/runs/x/checkpoint_dir``                  a directory holding one ``*.safetensors`` file, resolved as above
==========================================  ===========================================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_NAME_METADATA_KEY = "model_name"


class ModelRefError(ValueError):
    """A ``--model`` value that names no model this code can build."""


@dataclass(frozen=True)
class ModelRef:
    """A model the actors can build on their own.

    Attributes:
        name: ``family/arch`` understood by ``robustfm.models.create_model``.
        pretrained: a pretrained tag, a local weights path, or None (random init).
        label: how reports and run names call this model.
        module_ref: a Ray object ref of an in-memory module (see :meth:`from_module`); overrides name/pretrained.
    """

    name: str
    pretrained: str | None = None
    label: str = ""
    module_ref: Any = None

    def __post_init__(self) -> None:
        if not self.label:
            tail = f"@{Path(self.pretrained).name if _looks_like_path(self.pretrained) else self.pretrained}"
            object.__setattr__(self, "label", self.name + (tail if self.pretrained else ""))

    @classmethod
    def from_module(cls, module: Any, label: str = "in-memory model") -> ModelRef:
        """Reference a model object (e.g. a finished stage's model) by putting a CPU copy in Ray's object store."""
        import copy

        import ray

        cpu_copy = copy.deepcopy(module).cpu().eval()
        return cls(name="in-memory", label=label, module_ref=ray.put(cpu_copy))

    def load(self) -> Any:
        """Build the model in eval mode (inside an actor)."""
        if self.module_ref is not None:
            import ray

            return ray.get(self.module_ref).eval()
        from robustfm.models import create_model

        return create_model(self.name, pretrained=self.pretrained).eval()

    def describe(self) -> dict[str, Any]:
        """What the protocol records about the model."""
        return {"name": self.name, "pretrained": self.pretrained, "label": self.label}


def _looks_like_path(text: str | None) -> bool:
    return bool(text) and ("/" in text or text.endswith((".safetensors", ".pt", ".pth", ".bin")))


def parse_model_ref(text: str) -> ModelRef:
    """Resolve a ``--model`` value (see the module docstring for the syntax).

    Raises:
        ModelRefError: the path does not exist, or the architecture of a weights file cannot be determined.
    """
    text = text.strip()
    if not text:
        raise ModelRefError("--model is empty: give 'family/arch', 'family/arch@tag' or a weights path")
    path = Path(text).expanduser()
    if path.exists():
        weights = _weights_file(path)
        return ModelRef(name=_architecture_of(weights), pretrained=str(weights.resolve()))
    if "@" not in text and (text.startswith(("/", "./", "../", "~")) or text.endswith(".safetensors")):
        raise ModelRefError(f"model path {text!r} does not exist")
    name, _, pretrained = text.partition("@")
    family, sep, arch = name.partition("/")
    if not (sep and family and arch):
        raise ModelRefError(
            f"model {text!r} must look like 'family/arch[@tag_or_path]' (e.g. open_clip/ViT-B-32@openai)"
        )
    if pretrained and _looks_like_path(pretrained) and not Path(pretrained).expanduser().exists():
        raise ModelRefError(f"weights file {pretrained!r} of model {text!r} does not exist")
    return ModelRef(name=name, pretrained=pretrained or None)


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) != 1:
        found = ", ".join(c.name for c in candidates) or "none"
        raise ModelRefError(
            f"checkpoint directory {str(path)!r} must hold exactly one *.safetensors file (found: {found})"
        )
    return candidates[0]


def _architecture_of(weights: Path) -> str:
    """The ``family/arch`` a weights file was saved from: safetensors metadata, else a resolved config nearby."""
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get(MODEL_NAME_METADATA_KEY):
            return metadata[MODEL_NAME_METADATA_KEY]
        if metadata.get("format") and metadata.get("arch"):  # robustfm.models.export writes the family and arch
            return f"{metadata['format']}/{metadata['arch']}"
    for directory in (weights.parent, weights.parent.parent):
        for candidate in ("model.json", "resolved_config.yaml"):
            found = _model_name_in(directory / candidate)
            if found:
                return found
    raise ModelRefError(
        f"cannot tell the architecture of {str(weights)!r}: no '{MODEL_NAME_METADATA_KEY}' in its safetensors metadata "
        "and no resolved_config.yaml (model.name) beside it; pass it as 'family/arch@PATH', e.g. "
        f"'open_clip/ViT-B-32@{weights}'"
    )


def _model_name_in(path: Path) -> str | None:
    if not path.is_file():
        return None
    import yaml

    data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        return None
    model = data.get("model", data)
    name = model.get("name") if isinstance(model, dict) else None
    return name if isinstance(name, str) and "/" in name else None
