"""``knn_detection`` roles without Ray: disjoint, fixed by the ids alone, and a class too small for them is named."""

from __future__ import annotations

import pytest

from robustfm.config import ConfigError
from robustfm.evals.suites.knn_detection import KnnDetectionConfig, split_roles


def test_roles_are_disjoint_sized_and_independent_of_order():
    section = KnnDetectionConfig(pool_per_class=3, queries_per_class=2, target_images=2)
    ids = [f"{c}/{k}" for c in ("safe", "unsafe", "other") for k in range(8)]
    names = [i.split("/")[0] for i in ids]
    roles = split_roles(ids, names, section)
    assert set(roles) == {"safe", "unsafe"}
    safe = roles["safe"]
    assert (len(safe["pool"]), len(safe["query"]), len(safe["target"])) == (3, 2, 2)
    assert not set(safe["pool"]) & set(safe["query"]) and not set(safe["target"]) & set(safe["pool"] + safe["query"])
    assert roles["unsafe"]["target"] == [] and all(i.startswith("unsafe/") for i in roles["unsafe"]["pool"])
    assert split_roles(ids[::-1], names[::-1], section) == roles


def test_a_class_too_small_for_its_roles_is_named():
    section = KnnDetectionConfig(pool_per_class=3, queries_per_class=2, target_images=2)
    ids = [f"safe/{k}" for k in range(7)] + [f"unsafe/{k}" for k in range(4)]
    with pytest.raises(ValueError, match="class 'unsafe' has 4 images, its pool, queries and targets need 5"):
        split_roles(ids, [i.split("/")[0] for i in ids], section)


def test_the_classes_must_differ():
    with pytest.raises(ConfigError, match="buffer_class"):
        KnnDetectionConfig(buffer_class="safe")
