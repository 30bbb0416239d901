"""Zero-shot robust accuracy: APGD-CE and APGD-T against the zero-shot classifier, on a fixed subset of the images.

The classifier is the one RobustVLM's ``clip_robustbench`` attacks: logits = ``logit_scale.exp()`` x the cosine of the
normalized image embedding with each class's normalized text embedding (the model's own temperature, which sets
the CE's scale). An image is robust when it is classified right clean and no iterate of any attack flips it
(auto-attack's rule, applied to every image: none is skipped as torchattacks would). Rows whose loss or gradient was
not finite count as not robust and are reported as ``failed``; rows that met an all-zero gradient are reported too
(gradient masking shows up instead of looking robust).

The subset is fixed: the first ``n`` labelled images ordered by a hash of their id alone (:func:`attack_subset`), so
any run, seed or batch size attacks the same images; the protocol records its size and the SHA-256 of its ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

ATTACKS = ("apgd_ce", "apgd_t")
"""``apgd_ce``: untargeted APGD on the CE (auto-attack's APGD-CE); ``apgd_t``: APGD on the targeted DLR loss towards
each runner-up class, one restart each (auto-attack's APGD-T)."""
ALL_ATTACKS = "attacks"
"""The condition prefix of "robust to every configured attack" (auto-attack's ensemble: ``attacks_linf:<eps>``)."""


def attack_subset(ids: Sequence[str], labels: Sequence[int], n: int | None) -> list[str]:
    """The ids of the attacked subset: labelled rows (label >= 0), ordered by BLAKE2b of the id, first ``n`` (None:
    all), returned sorted. Independent of seeds, batches and actors."""
    labelled = sorted({str(i) for i, label in zip(ids, labels, strict=True) if int(label) >= 0})
    ranked = sorted(labelled, key=lambda i: hashlib.blake2b(i.encode(), digest_size=8).digest())
    return sorted(ranked if n is None else ranked[:n])


def with_attack_subset_digest(params: Mapping[str, Any]) -> dict[str, Any]:
    """Scorer params for a protocol record: ``attack_ids`` replaced by ``attack_subset`` = its size and the SHA-256
    of its ids (which images were attacked, without listing them)."""
    from robustfm.evals.data import ids_hash

    ids = params.get("attack_ids", [])
    shortened = {k: v for k, v in params.items() if k != "attack_ids"}
    shortened["attack_subset"] = {"num_samples": len(ids), "sample_ids_sha256": ids_hash(ids) if ids else None}
    return shortened


def condition(attack: str, norm: str, eps: float) -> str:
    """``apgd_ce_linf:0.0156863``: the metric-key-safe name of one attack condition (eps in [0,1] pixel units)."""
    from robustfm.evals.suite import condition_name

    return condition_name(f"{attack}_{norm}", eps)


def attack_rows(
    model: Any,
    class_embeddings: Any,
    pixels: Any,
    ids: Sequence[str],
    labels: Sequence[int],
    params: Mapping[str, Any],
    seed: int,
    precision: str,
) -> list[dict[str, Any]]:
    """One row per (image, attack condition) for the images of ``ids`` in the attacked subset.

    Args:
        model: a frozen ClipModel in eval mode.
        class_embeddings: ``(C, E)`` normalized fp32 text embeddings, on the model's device.
        pixels: ``(N, 3, S, S)`` [0,1] pixels of the batch; ``ids``/``labels`` its rows (labels: class indices).
        params: the suite's scorer params (``attacks``, ``attack_norm``, ``attack_eps``, ``attack_steps``,
            ``attack_restarts``, ``attack_target_classes``, ``attack_ids``).
        seed: the evaluation seed (per-image random starts are drawn from it and the id).
        precision: ``fp32`` or ``bf16`` (the model's forward inside the attack).
    """
    import torch
    import torch.nn.functional as F

    chosen = set(params["attack_ids"])
    keep = [i for i, (sample, label) in enumerate(zip(ids, labels, strict=True)) if sample in chosen and label >= 0]
    if not keep or not params["attacks"]:
        return []
    index = torch.tensor(keep, device=pixels.device)
    x, y = pixels[index], torch.tensor([labels[i] for i in keep], device=pixels.device, dtype=torch.long)
    kept_ids = [ids[i] for i in keep]
    scale = model.logit_scale.detach().float().exp()

    def logits(points: torch.Tensor) -> torch.Tensor:
        return scale * F.normalize(model.encode_image(points).float(), dim=-1) @ class_embeddings.T

    with torch.no_grad():
        clean = logits(x)
    correct = clean.argmax(dim=1) == y
    rows: list[dict[str, Any]] = []
    for eps in params["attack_eps"]:
        every = correct.clone()
        every_failed, every_zero = torch.zeros_like(correct), torch.zeros_like(correct)
        for attack in params["attacks"]:
            name = condition(attack, params["attack_norm"], eps)
            seeds = [_row_seed(i, name, seed) for i in kept_ids]
            fooled, failed, zero, points = _run(attack, logits, x, y, clean, eps, params, seeds, precision, model)
            robust = correct & ~fooled & ~failed
            every &= robust
            every_failed |= failed
            every_zero |= zero
            with torch.no_grad():
                at_points = logits(points)
            rows.extend(_rows(kept_ids, y, at_points, robust, failed, zero, name))
        name = condition(ALL_ATTACKS, params["attack_norm"], eps)
        rows.extend(_rows(kept_ids, y, clean, every, every_failed, every_zero, name))
    return rows


def _row_seed(sample_id: str, name: str, seed: int) -> int:
    from robustfm.seeding import sample_seed

    return sample_seed(sample_id, 0, f"zero_shot/{name}", seed)


def _run(
    attack: str,
    logits: Callable[[Any], Any],
    x: Any,
    y: Any,
    clean: Any,
    eps: float,
    params: Mapping[str, Any],
    seeds: list[int],
    precision: str,
    model: Any,
) -> tuple[Any, Any, Any, Any]:
    """(fooled, failed, had a zero gradient, the decisive point) per row, of one attack on the rows ``x``."""
    import torch

    from robustfm.attacks import AttackConfig, apgd

    if attack == "apgd_ce":
        config = AttackConfig(
            norm=params["attack_norm"],
            eps=float(eps),
            steps=params["attack_steps"],
            restarts=params["attack_restarts"],
            objective="ce",
            precision=precision,
        )
        result = apgd(logits, x, {"labels": y}, config, row_seeds=seeds, eval_modules=model)
        return result.success, result.failed, result.zero_grad_steps > 0, _decisive(result)
    config = AttackConfig(
        norm=params["attack_norm"], eps=float(eps), steps=params["attack_steps"], objective="dlr_targeted",
        precision=precision,
    )  # fmt: skip
    # The targets are the highest-scoring classes other than the true one (auto-attack takes the 2nd, 3rd ... highest
    # logits, which for a misclassified image can be the true class itself: a zero DLR loss and gradient).
    without_true = clean.scatter(1, y[:, None], float("-inf"))
    runner_up = without_true.argsort(dim=1, descending=True)
    fooled = torch.zeros_like(y, dtype=torch.bool)
    failed, zero, points = torch.zeros_like(fooled), torch.zeros_like(fooled), x.clone()
    for rank in range(min(params["attack_target_classes"], clean.shape[1] - 1)):
        target = {"labels": y, "target_labels": runner_up[:, rank]}
        result = apgd(logits, x, target, config, row_seeds=[s + rank for s in seeds], eval_modules=model)
        new = result.success & ~fooled
        points = torch.where(new.view(-1, 1, 1, 1), result.x_success, points)
        fooled |= result.success
        failed |= result.failed
        zero |= result.zero_grad_steps > 0
    return fooled, failed, zero, points


def _decisive(result: Any) -> Any:
    """The point that fooled the row (auto-attack's ``x_best_adv``) or, if none did, the highest-loss point."""
    import torch

    return torch.where(result.success.view(-1, 1, 1, 1), result.x_success, result.x_adv)


def _rows(
    ids: Sequence[str], labels: Any, logits: Any, robust: Any, failed: Any, zero: Any, name: str
) -> list[dict[str, Any]]:
    values = logits.detach().cpu().numpy().astype(np.float32)
    flags = [t.detach().cpu().numpy() for t in (labels, robust, failed, zero)]
    return [
        {
            "id": sample,
            "condition": name,
            "label": int(label),
            "logits": row,
            "robust": int(r),
            "attack_failed": int(f),
            "zero_gradient": int(z),
        }
        for sample, row, label, r, f, z in zip(ids, values, *flags, strict=True)
    ]
