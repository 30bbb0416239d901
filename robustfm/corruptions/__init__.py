"""The 19 ImageNet-C corruptions, batched in torch, with the reference's severity tables and named sets.

Usage::

    from robustfm.corruptions import CORRUPTION_SETS, corrupt_batch, draw_corruption
    from robustfm.seeding import sample_seed

    seeds = [sample_seed(i, epoch, "corruption", run_seed) for i in ids]
    picks = [draw_corruption(s, CORRUPTION_SETS["seen"]) for s in seeds]
    corrupted = corrupt_batch(images, [p[0] for p in picks], [p[1] for p in picks], seeds)

Each corruption is a registered :class:`Corruption` (``CORRUPTIONS.meta(name)["severities"]`` is its table)
made of a per-sample ``draw`` and a deterministic batched ``apply``; see :mod:`robustfm.corruptions.base`.
The reference is the ``imagecorruptions`` package (1.1.2); frost needs its frost images at run time
(``pip install imagecorruptions``, see :mod:`robustfm.corruptions.weather`).
"""

from __future__ import annotations

from robustfm.corruptions import blur, digital, noise, spatter, weather  # noqa: F401  (they register themselves)
from robustfm.corruptions.api import corrupt, corrupt_batch, make_draws
from robustfm.corruptions.base import CORRUPTIONS, SEVERITIES, Corruption, check_severity
from robustfm.corruptions.sets import CORRUPTION_SETS, corruption_set, draw_corruption
from robustfm.corruptions.weather import FrostImagesMissingError, frost_image_dir

__all__ = [
    "CORRUPTIONS",
    "CORRUPTION_SETS",
    "SEVERITIES",
    "Corruption",
    "FrostImagesMissingError",
    "check_severity",
    "corrupt",
    "corrupt_batch",
    "corruption_set",
    "draw_corruption",
    "frost_image_dir",
    "make_draws",
]
