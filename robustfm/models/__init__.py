"""Model factory over open_clip and timm names, tiny registered test configs, and weights I/O.

Importing this package does not import open_clip or timm: they load when :func:`create_model` builds a model.
"""

from robustfm.models.clip import ClipModel, TokensUnavailableError, open_clip_state_dict
from robustfm.models.factory import MODELS, TINY_CONV_MODELS, TINY_MODELS, create_model, split_model_name
from robustfm.models.timm_classifier import TimmClassifier, timm_state_dict
from robustfm.models.weights import (
    CheckpointMismatchError,
    PretrainedUnavailableError,
    load_weights,
    read_state_dict,
    save_weights,
)

__all__ = [
    "MODELS",
    "TINY_CONV_MODELS",
    "TINY_MODELS",
    "CheckpointMismatchError",
    "ClipModel",
    "PretrainedUnavailableError",
    "TimmClassifier",
    "TokensUnavailableError",
    "create_model",
    "load_weights",
    "open_clip_state_dict",
    "read_state_dict",
    "save_weights",
    "split_model_name",
    "timm_state_dict",
]
