"""Item ``corruptions``: the seen set on CUDA at 224 px (img/s per corruption and for the whole set) and CPU-vs-CUDA
agreement of every corruption on the same photos.

Throughput: a batch of 256 photos, one corruption for the whole batch, draws made on the GPU
(``draw_device="cuda"``, as a GPU pipeline would), then a mixed batch cycling through the nine seen corruptions and
the five severities. Goal: >= 50,000 img/s for the mixed batch.

Agreement: ``apply`` of each corruption is deterministic given its draws, so the draws are made once on the CPU and
the same draws are applied on the CPU and on CUDA (TF32 off: cuDNN's convolutions would otherwise round inputs to
10-bit mantissas). Every one of the 19 registered corruptions is compared, at severities 2 and 5; those without
random draws are "deterministic", the others use the shared draws. Tolerances on [0, 1] pixels (mean, max |diff|):
1e-5 and 1e-4, float32 rounding with room for a different order of operations; glass_blur 2e-4 and 0.02, because it
truncates to 8-bit grey levels and a value within float rounding of a level can land on either side (the parity
test of tests/unit/test_corruptions_parity.py allows the same against the reference). In the dry run (no CUDA) the
"other device" is the CPU again: only the code path is checked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpu_items.common import ItemReport, Profile, device_name, fmt_rate, progress, time_rate

THROUGHPUT_GOAL = 50_000
SEVERITIES = (2, 5)
TOLERANCE = {"default": (1e-5, 1e-4), "glass_blur": (2e-4, 0.02)}


def photo_batch(count: int, size: int) -> torch.Tensor:
    """``count`` photos bundled with scikit-image (cycled, every other cycle mirrored), float (N, 3, S, S) in [0,1]."""
    from robustfm.data.demo_images import real_photos

    photos = list(real_photos(size).values())
    images = [
        photos[i % len(photos)][:, ::-1] if (i // len(photos)) % 2 else photos[i % len(photos)] for i in range(count)
    ]
    return torch.from_numpy(np.stack(images).copy()).permute(0, 3, 1, 2).float().div(255).contiguous()


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def throughput(profile: Profile) -> tuple[dict[str, float], float]:
    from robustfm.corruptions import CORRUPTION_SETS, corrupt_batch

    n, device = profile.pick(256, 8), profile.device
    images = photo_batch(n, profile.image_size).to(device)
    seeds = list(range(n))
    seen = CORRUPTION_SETS["seen"]
    min_seconds = profile.pick(1.0, 0.1)
    rates = {}
    for name in seen:
        rates[name] = time_rate(
            lambda name=name: corrupt_batch(images, [name] * n, [3] * n, seeds, draw_device=device),
            n,
            device,
            min_seconds,
        )
    names = [seen[i % len(seen)] for i in range(n)]
    severities = [1 + i % 5 for i in range(n)]
    mixed = time_rate(
        lambda: corrupt_batch(images, names, severities, seeds, draw_device=device), n, device, min_seconds
    )
    return rates, mixed


def agreement(profile: Profile) -> list[dict[str, Any]]:
    from robustfm.corruptions import CORRUPTIONS, FrostImagesMissingError, corrupt, make_draws

    other = profile.device
    images = photo_batch(profile.pick(4, 2), profile.image_size)
    rows = []
    for name in sorted(CORRUPTIONS.names()):
        random = CORRUPTIONS.get(name).is_random
        mean_tol, max_tol = TOLERANCE.get(name, TOLERANCE["default"])
        row: dict[str, Any] = {"corruption": name, "kind": "random, same draws" if random else "deterministic"}
        worst_mean = worst_max = 0.0
        try:
            for severity in SEVERITIES:
                generators = [torch.Generator().manual_seed(1000 * severity + i) for i in range(len(images))]
                draws = make_draws(images, name, severity, generators)
                on_cpu = corrupt(images, name, severity, draws=draws)
                with tf32_off():
                    moved = {key: value.to(other) for key, value in draws.items()}
                    on_other = corrupt(images.to(other), name, severity, draws=moved).cpu()
                diff = (on_cpu.double() - on_other.double()).abs()
                worst_mean, worst_max = max(worst_mean, diff.mean().item()), max(worst_max, diff.max().item())
        except FrostImagesMissingError:
            rows.append({**row, "mean abs diff": "-", "max abs diff": "-", "agrees": "skipped: no frost images"})
            continue
        agrees = worst_mean <= mean_tol and worst_max <= max_tol
        progress(f"{name}: mean |diff| {worst_mean:.2e}, max {worst_max:.2e}")
        rows.append({**row, "mean |diff|": f"{worst_mean:.1e}", "max |diff|": f"{worst_max:.1e}", "agrees": agrees})
    return rows


def corruptions(profile: Profile, workdir: Path) -> ItemReport:
    rates, mixed = throughput(profile)
    progress(f"throughput: {rates}, mixed {mixed:.0f} img/s")
    rows = agreement(profile)
    whole_pass = len(rates) / sum(1 / rate for rate in rates.values())  # one image through each of the nine
    disagree = [row["corruption"] for row in rows if row["agrees"] is False]
    skipped = [row["corruption"] for row in rows if isinstance(row["agrees"], str)]
    deterministic = [row for row in rows if row["kind"] == "deterministic"]
    met = mixed >= THROUGHPUT_GOAL and not disagree
    table = [{"corruption": name, "img/s": fmt_rate(rate)} for name, rate in rates.items()]
    table.append({"corruption": "mixed seen batch (the set)", "img/s": fmt_rate(mixed)})
    return ItemReport(
        summary=(
            f"{device_name(profile.device)}, {profile.image_size} px: seen set {fmt_rate(mixed)} img/s mixed "
            f"(slowest {min(rates, key=rates.get)} {fmt_rate(min(rates.values()))}); CPU vs {profile.device}: "
            f"{len(rows) - len(disagree) - len(skipped)}/{len(rows)} agree"
            + (f", DISAGREE: {', '.join(disagree)}" if disagree else "")
            + (f", skipped: {', '.join(skipped)}" if skipped else "")
        ),
        metrics={
            "per_corruption_img_s": rates,
            "mixed_seen_img_s": mixed,
            "one_image_through_each_img_s": whole_pass,
            "agreement": rows,
            "deterministic_agree": all(row["agrees"] is True for row in deterministic),
            "tolerances_mean_max": TOLERANCE,
        },
        goal=f"mixed seen batch >= {THROUGHPUT_GOAL:,} img/s and every corruption agrees between CPU and CUDA",
        goal_met=met if profile.gpu else None,
        tables={"throughput (severity 3, batch of photos)": table, f"CPU vs {profile.device}, same draws": rows},
    )
