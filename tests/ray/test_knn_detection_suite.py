"""``knn_detection`` on an image folder of safe / unsafe / buffer pictures converted by ``prepare_data``: fixed roles
by id hash, shares that sum to 1 and equal a brute force over the scored embeddings, the attack lowering detection."""

from __future__ import annotations

import numpy as np
import pytest

from robustfm.data.config import PrepareConfig, SourceConfig
from robustfm.data.prepare import run as prepare
from robustfm.testing.retrieval import make_safety_folder

pytestmark = [pytest.mark.ray]


@pytest.mark.timeout(600)
def test_shares_clean_and_under_the_targeted_attack(ray_session, tmp_path):
    from robustfm.evals.config import ActorPoolConfig, EvalConfig, EvalDataConfig, SuiteSettings
    from robustfm.evals.runner import run_suite
    from robustfm.evals.suites.knn_detection import KnnDetectionConfig, split_roles

    root = make_safety_folder(tmp_path / "folder", per_class=10, size=48, buffer=True)
    shards = tmp_path / "shards"
    prepare(PrepareConfig(source=SourceConfig(kind="image_folder", root=str(root)), output=str(shards), progress=False))
    section = KnnDetectionConfig(
        data=EvalDataConfig(shards=str(shards), split="train"),
        buffer_class="buffer",
        pool_per_class=4,
        queries_per_class=4,
        target_images=2,
        attack_eps=(32 / 255,),
        attack_steps=10,
    )
    pool = ActorPoolConfig(min_actors=1, max_actors=2, batch_size=8, wait_for_min_actors_s=0, num_cpus=0.5)
    cfg = EvalConfig(
        seed=1, output_dir=str(tmp_path / "e"), pool=pool, suites=SuiteSettings.build({"knn_detection": section})
    )
    result = run_suite("knn_detection", "open_clip/tiny-vit", cfg, keep_rows=True)
    rows, metrics = result.rows, result.metrics

    # Roles: 4 pool images per class, 4 queries of safe and unsafe, 2 safe targets in neither; 20 images scored.
    roles = result.params["roles"]
    assert {c: len(r["pool"]) for c, r in roles.items()} == {"safe": 4, "unsafe": 4, "buffer": 4}
    assert {c: len(r["query"]) for c, r in roles.items()} == {"safe": 4, "unsafe": 4, "buffer": 0}
    targets = set(result.params["target_ids"])
    assert len(targets) == 2 and not targets & set(rows["id"]) and result.counts["scored"] == 20
    ids = [f"{c}/{c}_{k:03d}.png" for c in ("safe", "unsafe", "buffer") for k in range(10)]
    again = split_roles(ids[::-1], [i.split("/")[0] for i in ids[::-1]], section)
    assert again["unsafe"]["pool"] == roles["unsafe"]["pool"]  # a hash of the ids, whatever their order

    attacked = f"apgd_targeted_set_linf:{32 / 255:g}"
    pool_mask = (rows["role"] == "pool") & (rows["condition"] == "clean")
    pool_embeddings, pool_classes = rows["embedding"][pool_mask], rows["class_name"][pool_mask]
    for name, query_class in (("clean", "safe"), ("clean", "unsafe"), (attacked, "unsafe")):
        mask = (rows["role"] == "query") & (rows["condition"] == name) & (rows["class_name"] == query_class)
        nearest = pool_classes[np.argmax(rows["embedding"][mask] @ pool_embeddings.T, axis=1)]
        shares = [metrics[f"{name}/{query_class}/{c}"] for c in ("safe", "unsafe", "buffer")]
        assert sum(shares) == pytest.approx(1.0)
        for pool_class, share in zip(("safe", "unsafe", "buffer"), shares, strict=True):
            assert share == pytest.approx(np.mean(nearest == pool_class))
    assert metrics["clean/unsafe/unsafe"] >= 0.75  # generated shapes find generated shapes
    assert metrics[f"{attacked}/unsafe/unsafe"] <= metrics["clean/unsafe/unsafe"]
    assert metrics[f"{attacked}/detection_drop"] >= 0
    assert result.protocol["params"]["resolved"]["targets"]["count"] == 2
    assert f"{attacked}/safe/safe" not in metrics  # only unsafe queries are attacked
