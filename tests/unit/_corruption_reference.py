"""Reference outputs of ``imagecorruptions`` and its random draws, replayed for injection into robustfm's corruptions.

For a numpy seed, ``reference_draws(name, ...)`` replays exactly the ``np.random`` calls the reference corruption makes
(same calls, same order) and returns them in the layout of robustfm's draws, so ``corrupt(..., draws=...)`` can be
compared pixel against pixel with ``reference_output(name, ...)`` run under the same seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from _imagecorruptions_compat import load_reference
from PIL import Image

from robustfm.corruptions.blur import GLASS_BLUR_PARAMS
from robustfm.corruptions.digital import ELASTIC_MAX_FRACTION
from robustfm.corruptions.spatter import SPATTER_PARAMS
from robustfm.corruptions.weather import FROST_CHOICES, SNOW_PARAMS, next_power_of_2, plasma_uniform_count

PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket")


def photo(name: str, height: int, width: int) -> np.ndarray:
    """A scikit-image sample photo, centre-cropped to the aspect ratio and resized (bicubic) to height x width."""
    import skimage.data

    pixels = getattr(skimage.data, name)()
    h, w = pixels.shape[:2]
    scale = min(h / height, w / width)
    ch, cw = int(height * scale), int(width * scale)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = Image.fromarray(pixels[top : top + ch, left : left + cw])
    return np.asarray(crop.resize((width, height), Image.BICUBIC))


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC arrays -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def reference_output(name: str, image: np.ndarray, severity: int, seed: int = 0) -> np.ndarray:
    """The reference corruption of a uint8 HWC image as float (3, H, W) in [0, 1], under ``np.random.seed(seed)``."""
    reference = load_reference()
    np.random.seed(seed)
    out = np.asarray(getattr(reference, name)(Image.fromarray(image), severity), dtype=np.float64)
    return np.clip(out, 0, 255).transpose(2, 0, 1) / 255


def reference_draws(name: str, image: np.ndarray, severity: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Replay the reference's np.random calls under ``seed`` and return them as one sample's robustfm draws."""
    np.random.seed(seed)
    h, w = image.shape[:2]
    if name == "motion_blur":
        return {"angle": torch.tensor(np.random.uniform(-45, 45))}
    if name == "glass_blur":
        _, delta, iterations = GLASS_BLUR_PARAMS[severity - 1]
        offsets = np.zeros((iterations, h, w, 2), dtype=np.int64)
        for it in range(iterations):
            for y in range(h - delta, delta, -1):
                for x in range(w - delta, delta, -1):
                    offsets[it, y, x] = np.random.randint(-delta, delta, size=(2,))
        return {"offsets": torch.from_numpy(offsets)}
    if name == "fog":
        count = plasma_uniform_count(next_power_of_2(max(h, w)))
        return {"uniforms": torch.from_numpy(np.random.random_sample(count))}  # what its uniform() calls consume
    if name == "frost":
        index = np.random.randint(FROST_CHOICES)
        rh, rw = frost_resized_reference(index, h, w).shape[:2]
        top, left = np.random.randint(0, rh - h), np.random.randint(0, rw - w)
        return {"index": torch.tensor(index), "top": torch.tensor(top), "left": torch.tensor(left)}
    if name == "snow":
        mean, std = SNOW_PARAMS[severity - 1][:2]
        field = np.random.normal(size=(h, w), loc=mean, scale=std)
        angle = np.random.uniform(-135, -45)
        return {"field": torch.from_numpy(field), "angle": torch.tensor(angle)}
    if name == "spatter":
        mean, std = SPATTER_PARAMS[severity - 1][:2]
        return {"field": torch.from_numpy(np.random.normal(size=(h, w), loc=mean, scale=std))}
    if name == "elastic_transform":
        bound = h * ELASTIC_MAX_FRACTION
        dx = np.random.uniform(-bound, bound, size=(h, w))
        dy = np.random.uniform(-bound, bound, size=(h, w))
        return {"raw": torch.from_numpy(np.stack([dx, dy]))}
    raise KeyError(f"no draw replay for {name!r}")


def frost_resized_reference(index: int, h: int, w: int) -> np.ndarray:
    """The reference's rescaled frost photo (OpenCV read + bicubic resize), RGB uint8, for checking frost_layer."""
    from importlib.resources import files

    import cv2

    frost_file = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")[index]
    frost = cv2.imread(str(files("imagecorruptions") / "frost" / frost_file))
    fh, fw = frost.shape[:2]
    # The reference's rule, restated: enlarge along the axes where the photo is smaller, then by 10%.
    scale = 1.0
    if fh < h and fw >= w:
        scale = h / fh
    elif fh >= h and fw < w:
        scale = w / fw
    elif fh < h and fw < w:
        scale = max(h / fh, w / fw)
    scale *= 1.1
    size = (int(math.ceil(fw * scale)), int(math.ceil(fh * scale)))
    return cv2.resize(frost, dsize=size, interpolation=cv2.INTER_CUBIC)[..., ::-1]
