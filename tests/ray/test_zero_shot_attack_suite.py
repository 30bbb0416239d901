"""The ``zero_shot`` suite's attack conditions through Ray (actor pool with gradients): metric keys and directions,
robust accuracy at most the clean accuracy of the same subset, and a protocol that records the attacked subset."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.ray]


@pytest.mark.timeout(600)
def test_attack_conditions_are_scored_and_recorded(ray_session, tmp_path):
    from robustfm.evals.config import ActorPoolConfig, EvalConfig, EvalDataConfig, SuiteSettings
    from robustfm.evals.data import ids_hash
    from robustfm.evals.runner import run_suite
    from robustfm.evals.suites.zero_shot import ZeroShotConfig
    from robustfm.evals.zero_shot_attacks import attack_subset

    section = ZeroShotConfig(
        data=EvalDataConfig(synthetic_samples=10, synthetic_image_size=32),
        corruptions=(),
        perturbations=(),
        attacks=("apgd_ce", "apgd_t"),
        attack_eps=(2 / 255, 0.5),
        attack_steps=3,
        attack_target_classes=2,
        attack_samples=6,
    )
    pool = ActorPoolConfig(min_actors=1, max_actors=1, batch_size=4, wait_for_min_actors_s=0, num_cpus=0.5)
    cfg = EvalConfig(seed=3, output_dir=str(tmp_path), pool=pool, suites=SuiteSettings.build({"zero_shot": section}))
    result = run_suite("zero_shot", "open_clip/tiny-vit", cfg, keep_rows=True)

    metrics, subset = result.metrics, result.params["attack_ids"]
    assert len(subset) == 6 and result.counts["scored"] == 10
    ok = result.rows["status"] == "ok"
    assert subset == attack_subset(result.rows["id"][ok], result.rows["label"][ok], 6)
    for eps in (2 / 255, 0.5):
        for attack in ("apgd_ce", "apgd_t", "attacks"):
            key = f"{attack}_linf:{eps:g}"
            assert 0 <= metrics[f"{key}/robust_top1"] <= metrics["attack_subset/top1"]
            assert metrics[f"{key}/failed"] == 0
            assert result.directions[f"{key}/robust_top1"] == "higher"
        both = metrics[f"attacks_linf:{eps:g}/robust_top1"]
        assert both <= min(metrics[f"apgd_ce_linf:{eps:g}/robust_top1"], metrics[f"apgd_t_linf:{eps:g}/robust_top1"])
    assert metrics["attacks_linf:0.5/robust_top1"] == 0
    protocol = result.protocol
    assert protocol["suite"]["version"] == "3"
    recorded = protocol["params"]["resolved"]["attack_subset"]
    assert recorded == {"num_samples": 6, "sample_ids_sha256": ids_hash(subset)}
    assert "attack_ids" not in protocol["params"]["resolved"]
    assert protocol["params"]["config"]["attack_steps"] == 3
