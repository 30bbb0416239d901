"""``feature_inversion`` on the actor pool: the inversions reach the originals' embeddings far better than their
starts, stay in their L2 ball around the seeded noisy grey, and come back as a PNG grid."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.ray]


@pytest.mark.timeout(600)
def test_inversions_approach_the_embedding_within_their_ball(ray_session, tmp_path):
    import torch
    from PIL import Image

    from robustfm.evals.config import ActorPoolConfig, EvalConfig, EvalDataConfig, SuiteSettings
    from robustfm.evals.runner import run_suite
    from robustfm.evals.suites.feature_inversion import FeatureInversionConfig, inversion_start
    from robustfm.models import create_model
    from robustfm.models.weights import save_weights

    torch.manual_seed(0)
    model = create_model("open_clip/tiny-vit").eval()
    weights = tmp_path / "tiny" / "model.safetensors"
    save_weights(model, weights, metadata={"model_name": "open_clip/tiny-vit"})
    radius = 3.0
    section = FeatureInversionConfig(
        data=EvalDataConfig(synthetic_samples=6, synthetic_image_size=32), steps=40, radius=radius, grid_images=4
    )
    pool = ActorPoolConfig(min_actors=1, max_actors=2, batch_size=3, wait_for_min_actors_s=0, num_cpus=0.5)
    cfg = EvalConfig(
        seed=4, output_dir=str(tmp_path / "e"), pool=pool, suites=SuiteSettings.build({"feature_inversion": section})
    )
    result = run_suite("feature_inversion", str(weights), cfg, keep_rows=True)
    rows = result.rows

    assert result.counts["scored"] == 6 and result.metrics["failed"] == 0
    size = model.image_size
    for sample, original, inversion, cosine in zip(
        rows["id"], rows["original"], rows["inversion"], rows["cosine"], strict=True
    ):
        start = inversion_start(str(sample), 4, (3, size, size))
        z = inversion.astype(np.float32).transpose(2, 0, 1) / 255
        assert np.linalg.norm(z - start) <= radius + np.sqrt(z.size) * 0.5 / 255  # in the ball (uint8 rounding)
        with torch.no_grad():
            embed = lambda pixels: model.encode_image(torch.from_numpy(pixels)[None], normalize=True)[0]  # noqa: E731
            target = embed(original.astype(np.float32).transpose(2, 0, 1) / 255)
            from_start = float(embed(start) @ target)
        assert 1 - cosine < (1 - from_start) / 10, (sample, cosine, from_start)  # the gap shrinks tenfold
    assert result.metrics["mean/cosine"] == pytest.approx(float(np.mean(rows["cosine"])))
    grid = np.asarray(Image.open(result.artifact_dir / "images" / "inversions.png"))
    assert grid.shape == (2 * size + 2, 4 * size + 3 * 2, 3)
    assert np.array_equal(grid[:size, :size], rows["original"][0]) and np.array_equal(
        grid[size + 2 :, :size], rows["inversion"][0]
    )
