"""Named corruption sets and the per-sample draw of a corruption name and severity."""

from __future__ import annotations

import random
from collections.abc import Sequence

from robustfm.registry import did_you_mean

# The 15 corruptions of the ImageNet-C benchmark, in Hendrycks & Dietterich's order.
IMAGENET_C = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog",
    "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip
# ImageNet-C's four extra validation corruptions.
IMAGENET_C_EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")

CORRUPTION_SETS: dict[str, tuple[str, ...]] = {
    # CG-CLIP's training (seen) and held-out (unseen) corruptions.
    "seen": (
        "gaussian_noise", "speckle_noise", "motion_blur", "glass_blur", "gaussian_blur",
        "fog", "spatter", "pixelate", "brightness",
    ),
    "unseen": ("impulse_noise", "shot_noise", "defocus_blur", "zoom_blur", "snow", "frost", "saturate"),
    "imagenet_c": IMAGENET_C,
    "all": IMAGENET_C + IMAGENET_C_EXTRA,
}  # fmt: skip


def corruption_set(name: str) -> tuple[str, ...]:
    """The corruption names of set ``name`` ("seen", "unseen", "imagenet_c", "all")."""
    try:
        return CORRUPTION_SETS[name]
    except KeyError:
        hint = did_you_mean(name, tuple(CORRUPTION_SETS))
        raise KeyError(f"unknown corruption set {name!r}{hint} (known: {', '.join(CORRUPTION_SETS)})") from None


def draw_corruption(seed: int, names: Sequence[str], severities: Sequence[int] = (1, 2, 3, 4, 5)) -> tuple[str, int]:
    """Draw one corruption name and one severity, each uniformly and independently, from ``seed`` alone.

    Use a per-sample seed (``sample_seed(id, epoch, "corruption", run_seed)``) so that a sample gets the same
    corruption in any batch, on any worker and on every rerun.
    """
    from robustfm.corruptions.base import CORRUPTIONS, check_severity

    if not names:
        raise ValueError("draw_corruption needs at least one corruption name")
    if not severities:
        raise ValueError("draw_corruption needs at least one severity")
    for name in names:
        CORRUPTIONS.check(name)
    for severity in severities:
        check_severity(severity)
    rng = random.Random(int(seed))
    return names[rng.randrange(len(names))], int(severities[rng.randrange(len(severities))])
