"""Load the reference ``imagecorruptions`` (1.1.2) with the fixes it needs on this stack, for tests only.

- numpy 2 removed ``np.float_`` (its fog's plasma fractal uses it): alias it to float64.
- scikit-image removed ``gaussian(..., multichannel=True)`` (its glass_blur and gaussian_blur pass it): map it to
  ``channel_axis=-1``.
- it imports ``pkg_resources`` (setuptools < 82, pinned by the project).

The library never imports imagecorruptions; only these tests and the benchmark do.
"""

from __future__ import annotations

import warnings
from types import ModuleType

import numpy as np


def load_reference() -> ModuleType:
    """Return ``imagecorruptions.corruptions`` patched to run all 19 corruptions."""
    if not hasattr(np, "float_"):
        np.float_ = np.float64  # type: ignore[attr-defined]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pkg_resources and scipy.ndimage.interpolation deprecations
        from imagecorruptions import corruptions as reference
    from skimage.filters import gaussian as skimage_gaussian

    def gaussian(image, *args, multichannel=None, **kwargs):
        if multichannel:
            kwargs.setdefault("channel_axis", -1)
        return skimage_gaussian(image, *args, **kwargs)

    reference.gaussian = gaussian
    return reference
