"""Data: the shard format, sources (COCO, ImageNet, image folders), conversion, transforms and Ray Data reading.

Importing this package imports nothing heavy (its names are loaded on first use), so that config modules such as
:mod:`robustfm.data.stage_config` stay cheap to import; the Ray Data functions import Ray when called.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from robustfm.data.batch_source import ShardBatchSource, Stage
    from robustfm.data.columns import SCHEMA_VERSION, ColumnKind, ColumnSpec, shard_schema
    from robustfm.data.config import PrepareConfig, SourceConfig
    from robustfm.data.demo import write_demo_shards
    from robustfm.data.frozen_stage import EmbeddingLoader, frozen_model_stage
    from robustfm.data.images import ImageDecodeError, SkipReason, inspect_image, load_rgb
    from robustfm.data.reading import decode_images, iter_worker_batches, open_shards, to_torch_batch
    from robustfm.data.shards import (
        Location,
        ManifestError,
        MissingColumnError,
        load_manifest,
        require_columns,
        shard_columns,
    )
    from robustfm.data.sources import SOURCES, LayoutError, SourceItem, SourceListing
    from robustfm.data.stage_config import CorruptionStageConfig, FrozenStageConfig
    from robustfm.data.transforms import eval_image, transform_image, transform_row

_EXPORTS = {
    "ShardBatchSource": "batch_source",
    "Stage": "batch_source",
    "PrepareConfig": "config",
    "SourceConfig": "config",
    "write_demo_shards": "demo",
    "EmbeddingLoader": "frozen_stage",
    "frozen_model_stage": "frozen_stage",
    "ImageDecodeError": "images",
    "SkipReason": "images",
    "inspect_image": "images",
    "load_rgb": "images",
    "decode_images": "reading",
    "iter_worker_batches": "reading",
    "open_shards": "reading",
    "to_torch_batch": "reading",
    "SCHEMA_VERSION": "columns",
    "ColumnKind": "columns",
    "ColumnSpec": "columns",
    "Location": "shards",
    "ManifestError": "shards",
    "MissingColumnError": "shards",
    "load_manifest": "shards",
    "require_columns": "shards",
    "shard_columns": "shards",
    "shard_schema": "columns",
    "SOURCES": "sources",
    "LayoutError": "sources",
    "SourceItem": "sources",
    "SourceListing": "sources",
    "CorruptionStageConfig": "stage_config",
    "FrozenStageConfig": "stage_config",
    "eval_image": "transforms",
    "transform_image": "transforms",
    "transform_row": "transforms",
}

__all__ = [
    "ColumnKind",
    "ColumnSpec",
    "CorruptionStageConfig",
    "EmbeddingLoader",
    "FrozenStageConfig",
    "ImageDecodeError",
    "LayoutError",
    "Location",
    "ManifestError",
    "MissingColumnError",
    "PrepareConfig",
    "SCHEMA_VERSION",
    "SOURCES",
    "ShardBatchSource",
    "SkipReason",
    "SourceConfig",
    "SourceItem",
    "SourceListing",
    "Stage",
    "decode_images",
    "eval_image",
    "frozen_model_stage",
    "inspect_image",
    "iter_worker_batches",
    "load_manifest",
    "load_rgb",
    "open_shards",
    "require_columns",
    "shard_columns",
    "shard_schema",
    "to_torch_batch",
    "transform_image",
    "transform_row",
    "write_demo_shards",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'robustfm.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"robustfm.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
