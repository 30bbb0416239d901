"""The generic frozen-model stage: a robustfm model's embeddings computed by an actor pool equal ``encode_image``
of the same decoded images, with one actor and with two; local weights are overlaid; unpicklable loaders fail early."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustfm.data.frozen_stage import EmbeddingLoader, encode_image, frozen_model_stage
from robustfm.data.stage_config import FrozenStageConfig
from robustfm.data.transforms import eval_image
from robustfm.testing.datasets import generated_image

pytestmark = pytest.mark.ray
MODEL = "open_clip/tiny-vit"


def _rows(ray, size: int, n: int = 10):
    import io

    from PIL import Image

    rows = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.fromarray(generated_image(i % 3, 40, seed=i)).save(buffer, format="JPEG", quality=90)
        rows.append({"id": f"s{i}", "image": eval_image(buffer.getvalue(), size), "captions": ["a"]})
    return ray.data.from_items(rows, override_num_blocks=4), rows


def _direct(loader: EmbeddingLoader, rows) -> dict[str, np.ndarray]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the actors run 1 thread: same reduction order
    try:
        model = loader("cpu")
        with torch.inference_mode():
            out = encode_image(model, torch.from_numpy(np.stack([r["image"] for r in rows]))).numpy()
    finally:
        torch.set_num_threads(threads)
    return {r["id"]: e for r, e in zip(rows, out, strict=True)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("actors", [1, 2])
def test_embedding_stage_equals_encode_image_of_the_same_pixels(ray_session, actors):
    loader = EmbeddingLoader(MODEL, init_seed=4)
    size = loader("cpu").image_size
    ds, rows = _rows(ray_session, size)
    pool = FrozenStageConfig(min_actors=actors, max_actors=actors, num_cpus=0.5, batch_size=3)
    stage = frozen_model_stage(loader, inputs=("image",), output="target", apply=encode_image, pool=pool)
    out = {r["id"]: r for r in stage(ds, 0).take_all()}
    expected = _direct(loader, rows)
    assert sorted(out) == sorted(expected)
    for sample_id, row in out.items():
        assert row["target"].dtype == np.float32 and row["target"].shape == expected[sample_id].shape
        np.testing.assert_allclose(row["target"], expected[sample_id], rtol=1e-5, atol=1e-6)
        assert list(row["captions"]) == ["a"]  # other columns pass through
    assert not np.allclose(out["s0"]["target"], out["s1"]["target"])


@pytest.mark.timeout(300)
def test_weights_file_is_overlaid_on_the_model(ray_session, tmp_path):
    from robustfm.models.weights import save_weights

    other = EmbeddingLoader(MODEL, init_seed=11)
    save_weights(other("cpu"), tmp_path / "teacher.safetensors")
    overlaid = EmbeddingLoader(MODEL, weights=str(tmp_path / "teacher.safetensors"), init_seed=0)
    ds, rows = _rows(ray_session, overlaid("cpu").image_size, n=4)
    stage = frozen_model_stage(overlaid, output="teacher", apply=encode_image, pool=FrozenStageConfig(num_cpus=0.5))
    out = {r["id"]: r["teacher"] for r in stage(ds, 0).take_all()}
    expected, unloaded = _direct(other, rows), _direct(EmbeddingLoader(MODEL, init_seed=0), rows)
    for sample_id, embedding in out.items():
        np.testing.assert_allclose(embedding, expected[sample_id], rtol=1e-5, atol=1e-6)
        assert not np.allclose(embedding, unloaded[sample_id], atol=1e-3)


def module_level_loader(device):
    return None


def test_the_model_must_travel_as_plain_data():
    assert callable(frozen_model_stage(module_level_loader))  # module-level functions and frozen dataclasses pass
    with pytest.raises(TypeError, match="loader .* does not pickle"):
        frozen_model_stage(lambda device: None)
    with pytest.raises(TypeError, match="apply .* does not pickle"):
        frozen_model_stage(EmbeddingLoader(MODEL), apply=lambda model, x: x)
    with pytest.raises(ValueError, match="inputs"):
        frozen_model_stage(EmbeddingLoader(MODEL), inputs=())
    from robustfm.config.core import ConfigError

    with pytest.raises(ConfigError, match="max_actors"):
        FrozenStageConfig(min_actors=2, max_actors=1)
    assert FrozenStageConfig(num_gpus=0.5).device == "cuda" and FrozenStageConfig(num_cpus=3).threads == 3
