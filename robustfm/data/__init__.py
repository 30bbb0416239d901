"""Data: the shard format, sources (COCO, ImageNet, image folders), conversion and Ray Data reading.

Importing this package does not import Ray; the Ray Data functions import it when called.
"""

from robustfm.data.batch_source import ShardBatchSource, Stage
from robustfm.data.config import PrepareConfig, ShardDataConfig, SourceConfig
from robustfm.data.images import ImageDecodeError, SkipReason, inspect_image, load_rgb
from robustfm.data.reading import decode_images, iter_worker_batches, open_shards, to_torch_batch
from robustfm.data.shards import SCHEMA_VERSION, Location, ManifestError, load_manifest, shard_schema
from robustfm.data.sources import SOURCES, LayoutError, SourceItem, SourceListing

__all__ = [
    "SCHEMA_VERSION",
    "SOURCES",
    "ImageDecodeError",
    "LayoutError",
    "Location",
    "ManifestError",
    "PrepareConfig",
    "ShardBatchSource",
    "ShardDataConfig",
    "SkipReason",
    "SourceConfig",
    "SourceItem",
    "SourceListing",
    "Stage",
    "decode_images",
    "inspect_image",
    "iter_worker_batches",
    "load_manifest",
    "load_rgb",
    "open_shards",
    "shard_schema",
    "to_torch_batch",
]
