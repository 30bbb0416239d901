"""Helpers for tests and the CPU demo: tiny data sets in real layouts, built on the fly (no downloads)."""

from robustfm.testing.datasets import (
    BAD_FILE_KINDS,
    BAD_FILE_SKIP_REASON,
    FixtureTree,
    make_coco_tree,
    make_image_folder,
    make_imagenet_tree,
    real_photos,
    write_demo_shards,
)

__all__ = [
    "BAD_FILE_KINDS",
    "BAD_FILE_SKIP_REASON",
    "FixtureTree",
    "make_coco_tree",
    "make_image_folder",
    "make_imagenet_tree",
    "real_photos",
    "write_demo_shards",
]
