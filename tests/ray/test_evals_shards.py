"""The engine's hook on real shards: ``evaluate_model`` on an in-memory model, retrieval over COCO-style captions."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.ray]


@pytest.mark.timeout(900)
def test_evaluate_model_on_coco_shards_with_an_in_memory_model(ray_session, tmp_path):
    import torch

    from robustfm.data import open_shards
    from robustfm.evals import evaluate_model
    from robustfm.evals.config import ActorPoolConfig, EvalConfig, EvalDataConfig, SuiteSettings
    from robustfm.evals.data import decode_batch
    from robustfm.evals.metrics import recall_at_k
    from robustfm.evals.suites.retrieval import RetrievalConfig
    from robustfm.models import create_model
    from robustfm.testing.datasets import write_demo_shards

    shards = write_demo_shards(tmp_path / "demo", image_size=48, n_images=24, n_val=10, shard_size=4)
    torch.manual_seed(3)
    model = create_model("open_clip/tiny-vit").eval()
    cfg = EvalConfig(
        output_dir=str(tmp_path / "out"),
        # A fractional CPU: the Parquet read tasks must find a core beside the actor pool on a small Ray.
        pool=ActorPoolConfig(min_actors=1, max_actors=1, num_cpus=0.5, batch_size=3),
        suites=SuiteSettings.build({"retrieval": RetrievalConfig(
            data=EvalDataConfig(shards=str(shards), split="val", max_samples=8), captions_per_image=1, ks=(1, 3)
        )}),
    )  # fmt: skip
    metrics = evaluate_model(model, ["retrieval"], cfg, stage="adapt")
    assert sorted(metrics) == [
        f"retrieval/{d}/recall_at_{k}" for d in ("image_to_text", "text_to_image") for k in (1, 3)
    ]

    # Independent: the first 8 ids of the split, the model called directly, recall from the similarity matrix.
    rows = sorted(open_shards(str(shards), "val").take_all(), key=lambda r: r["id"])[:8]
    pixels, reasons = decode_batch([r["image"] for r in rows], [r["id"] for r in rows], model.image_size)
    assert reasons == [None] * 8
    with torch.inference_mode():
        images = model.encode_image(torch.from_numpy(pixels), normalize=True).double().numpy()
        texts = model.encode_text([list(r["captions"])[0] for r in rows], normalize=True).double().numpy()
    expected = recall_at_k(images @ texts.T, np.eye(8, dtype=bool), (1, 3))
    for k in (1, 3):
        assert metrics[f"retrieval/image_to_text/recall_at_{k}"] == pytest.approx(expected[k], abs=1e-9)
    assert (tmp_path / "out" / "in-memory_model" / "adapt" / "retrieval" / "protocol.json").is_file()
