"""``landmark_retrieval`` on a tiny Revisited Oxford/Paris tree converted by ``prepare_data``: queries cropped to their
boxes, mAP Medium and Hard equal to a brute force over the scored embeddings, and the attacked queries moved."""

from __future__ import annotations

import numpy as np
import pytest

from robustfm.data.config import PrepareConfig, SourceConfig
from robustfm.data.prepare import run as prepare
from robustfm.testing.retrieval import make_revisitop_tree
from tests.unit.test_landmark_retrieval import brute_force_ap

pytestmark = [pytest.mark.ray]


@pytest.mark.timeout(600)
def test_map_medium_and_hard_clean_and_attacked(ray_session, tmp_path):
    from robustfm.evals.config import ActorPoolConfig, EvalConfig, EvalDataConfig, SuiteSettings
    from robustfm.evals.runner import run_suite
    from robustfm.evals.suites.landmark_retrieval import LandmarkRetrievalConfig

    tree = make_revisitop_tree(tmp_path / "roxford", landmarks=4, size=48)
    shards = tmp_path / "shards"
    prepare(
        PrepareConfig(source=SourceConfig(kind="revisitop", root=str(tree.root)), output=str(shards), progress=False)
    )
    section = LandmarkRetrievalConfig(
        data=EvalDataConfig(shards=str(shards)),
        ground_truth=str(tree.root / "gnd_rtiny.pkl"),
        attack_eps=(16 / 255,),
        attack_steps=4,
    )
    pool = ActorPoolConfig(min_actors=1, max_actors=2, batch_size=8, wait_for_min_actors_s=0, num_cpus=0.5)
    cfg = EvalConfig(
        seed=1, output_dir=str(tmp_path / "e"), pool=pool, suites=SuiteSettings.build({"landmark_retrieval": section})
    )
    import torch

    from robustfm.models import create_model
    from robustfm.models.weights import save_weights

    torch.manual_seed(3)
    model = create_model("open_clip/tiny-vit").eval()
    weights = tmp_path / "tiny" / "model.safetensors"
    save_weights(model, weights, metadata={"model_name": "open_clip/tiny-vit"})
    result = run_suite("landmark_retrieval", str(weights), cfg, keep_rows=True)
    rows, metrics = result.rows, result.metrics

    assert result.counts["scored"] == 16 + 4 and metrics["missing"] == 0
    attacked = f"apgd_cosine_away_linf:{16 / 255:g}"
    gnd, imlist = tree.ground_truth["gnd"], tree.ground_truth["imlist"]
    database = {
        i: e
        for i, e, c, r in zip(rows["id"], rows["embedding"], rows["condition"], rows["role"], strict=True)
        if r == "database"
    }
    assert set(database) == set(imlist)
    matrix = np.stack([database[name] for name in imlist])
    for condition in ("clean", attacked):
        mask = (rows["condition"] == condition) & (rows["role"] == "query")
        queries = dict(zip(rows["id"][mask], rows["embedding"][mask], strict=True))
        for protocol, positives, junk in (
            ("medium", ("easy", "hard"), ("junk",)),
            ("hard", ("hard",), ("junk", "easy")),
        ):
            aps = []
            for index, query in enumerate(tree.ground_truth["qimlist"]):
                ranking = np.argsort(-(matrix @ queries[query]), kind="stable")
                wanted = np.concatenate([gnd[index][k] for k in positives])
                aps.append(brute_force_ap(ranking, wanted, np.concatenate([gnd[index][k] for k in junk])))
            assert metrics[f"{condition}/{protocol}/map"] == pytest.approx(np.mean(aps), abs=1e-6)
    # The crop: a query's clean embedding is that of its box, without the noisy frame, as decoded on the driver.
    import io

    from PIL import Image

    from robustfm.data.transforms import eval_image

    for index, query in enumerate(tree.ground_truth["qimlist"]):
        x0, y0, x1, y1 = (int(v) for v in gnd[index]["bbx"])
        buffer = io.BytesIO()
        Image.open(tree.root / "jpg" / f"{query}.jpg").convert("RGB").crop((x0, y0, x1, y1)).save(buffer, "PNG")
        pixels = torch.from_numpy(eval_image(buffer.getvalue(), model.image_size))[None]
        with torch.no_grad():
            expected = model.encode_image(pixels, normalize=True)[0].numpy()
        mask = (rows["id"] == query) & (rows["condition"] == "clean")
        np.testing.assert_allclose(rows["embedding"][mask][0], expected, atol=1e-5)
    clean = {
        i: e
        for i, e, c, r in zip(rows["id"], rows["embedding"], rows["condition"], rows["role"], strict=True)
        if r == "query" and c == "clean"
    }
    moved = {i: e for i, e, c in zip(rows["id"], rows["embedding"], rows["condition"], strict=True) if c == attacked}
    assert all(float(clean[q] @ moved[q]) < 0.999 for q in clean)
    assert result.protocol["params"]["resolved"]["ground_truth"]["queries"] == 4
