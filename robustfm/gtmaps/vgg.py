"""CG-CLIP's ground-truth map (eq. 1): L1 distance between VGG-16 features of the clean and the corrupted image.

Features are read at the end of each conv block, after its last ReLU and before pooling (relu1_2, relu2_2, relu3_3,
relu4_3, relu5_3, the taps LPIPS uses). Each layer's per-pixel L1 distance — eq. 1's sum over channels, so that a
512-channel layer weighs as the paper says, not 8 times less than a 64-channel one as a channel mean would — is
upsampled bilinearly to the input size; the maps of the chosen layers are averaged, then normalised by the fixed
scale of :class:`~robustfm.gtmaps.base.GTMapper`.

Weights: a torchvision name (``"IMAGENET1K_V1"``; downloads once into the torch hub cache), a local file (a
state dict read with ``weights_only=True``, or ``.safetensors``; keys of torchvision's ``vgg16()`` — ``features.N.*``,
classifier keys ignored — or of its ``features`` module alone — ``N.*``), or ``None`` for a seeded random init.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from robustfm.gtmaps.base import GTMapper
from robustfm.gtmaps.registry import VGG16_L1_DEFAULT_SCALE

# Index in torchvision's vgg16().features of the last ReLU of each conv block (before its max-pool).
RELU_INDEX = {1: 3, 2: 8, 3: 15, 4: 22, 5: 29}
LAYER_NAMES = {1: "relu1_2", 2: "relu2_2", 3: "relu3_3", 4: "relu4_3", 5: "relu5_3"}
TORCHVISION_WEIGHTS = ("IMAGENET1K_V1", "DEFAULT")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_INIT_SEED = 0
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class WeightsUnavailableError(RuntimeError):
    """Named weights could not be downloaded (offline machine); the message says how to pass a local file."""


def check_layers(layers: Sequence[int]) -> tuple[int, ...]:
    """Validate a layer selection (conv blocks 1..5) and return it sorted."""
    chosen = tuple(layers)
    if not chosen or any(isinstance(b, bool) or b not in RELU_INDEX for b in chosen) or len(set(chosen)) != len(chosen):
        raise ValueError(f"VGG-16 layers must be distinct conv blocks among 1..5 ({LAYER_NAMES}), got {layers!r}")
    return tuple(sorted(chosen))


def load_vgg16_weights(weights: str) -> dict[str, torch.Tensor]:
    """Read VGG-16 weights by torchvision name or local path; returns a state dict for ``vgg16().features``."""
    if weights in TORCHVISION_WEIGHTS:
        from torchvision.models import VGG16_Weights

        entry = VGG16_Weights[weights]
        try:
            state = torch.hub.load_state_dict_from_url(entry.url, progress=False, map_location="cpu", weights_only=True)
        except Exception as err:  # URLError, timeouts, proxies: all mean "not reachable from here"
            cache = Path(torch.hub.get_dir()) / "checkpoints"
            raise WeightsUnavailableError(
                f"could not download torchvision VGG-16 weights {weights!r} from {entry.url} ({err}). On an offline "
                f"machine, copy that file here and pass its local path (gt_map.weights=/path/{Path(entry.url).name}; "
                f"a torch state dict read with weights_only=True, or a .safetensors file), or place it in {cache}."
            ) from err
        return _features_only(state, source=entry.url)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"VGG-16 weights {weights!r}: neither a torchvision weights name ({', '.join(TORCHVISION_WEIGHTS)}) "
            "nor an existing file"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"VGG-16 weights {str(path)!r}: expected a state dict, got {type(state).__name__}")
    return _features_only(state, source=str(path))


def _features_only(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    features = {}
    for key, value in state.items():
        if key.startswith("classifier."):
            continue
        short = key.removeprefix("features.")
        index = short.split(".", 1)[0]
        if not index.isdigit():
            raise ValueError(f"VGG-16 weights {source!r}: unexpected key {key!r} (want features.N.weight/bias)")
        features[short] = value
    return features


def vgg16_features(depth: int = 30) -> nn.Sequential:
    """The first ``depth`` modules of torchvision's ``vgg16().features`` (same indices and keys), randomly initialised
    as torchvision does (Kaiming normal, fan-out; zero bias). Built directly: the 120M-parameter classifier that
    ``vgg16()`` would also initialise is never used here."""
    modules: list[nn.Module] = []
    in_channels = 3
    for width in VGG16_CONFIG:
        if width == "M":
            modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        conv = nn.Conv2d(in_channels, int(width), kernel_size=3, padding=1)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        modules += [conv, nn.ReLU(inplace=True)]
        in_channels = int(width)
    return nn.Sequential(*modules[:depth])


class VGGFeatureMapper(GTMapper):
    """CG-CLIP eq. 1 ground-truth map from a frozen VGG-16.

    Args:
        features: torchvision ``vgg16().features`` (any prefix that contains the chosen layers' ReLUs).
        layers: conv blocks (1..5) whose last ReLU is compared.
        scale: raw map value (a sum over channels of absolute feature differences, averaged over layers) mapped
            to 1; the default was fitted for layers 1..5 (see :mod:`robustfm.gtmaps.fit`) — refit for other layers.

    Inputs are [0,1] RGB images; the ImageNet normalisation happens inside.
    """

    def __init__(
        self, features: nn.Sequential, layers: Sequence[int] = (1, 2, 3, 4, 5), scale: float = VGG16_L1_DEFAULT_SCALE
    ) -> None:
        super().__init__(scale)
        self.layers = check_layers(layers)
        self._taps = {RELU_INDEX[b] for b in self.layers}
        # Nothing after the deepest tap is ever run.
        self.features = features[: max(self._taps) + 1]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def build(
        cls, weights: str | None = None, layers: Sequence[int] | None = None, scale: float | None = None
    ) -> VGGFeatureMapper:
        """Build with torchvision's VGG-16 architecture and ``weights`` (name, path, or None for a seeded random init).

        The random init is seeded so that every actor and every rerun builds the same network.
        """
        layers = check_layers((1, 2, 3, 4, 5) if layers is None else layers)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            features = vgg16_features(RELU_INDEX[max(layers)] + 1)
        if weights is not None:
            state = load_vgg16_weights(weights)
            needed = set(features.state_dict())
            missing = sorted(needed - set(state), key=lambda k: (int(k.split(".")[0]), k))
            if missing:
                raise ValueError(f"VGG-16 weights {weights!r} lack {missing} needed for layers {layers}")
            try:
                features.load_state_dict({k: state[k] for k in needed}, strict=True)
            except RuntimeError as err:
                raise ValueError(f"VGG-16 weights {weights!r} do not fit torchvision's vgg16: {err}") from err
        if scale is None and layers != (1, 2, 3, 4, 5):
            warnings.warn(
                f"vgg16_l1: the default scale was fitted for layers 1..5, not {layers}; fit one for these layers "
                "(python -m robustfm.gtmaps.fit --layers ...) and pass it as gt_map.scale",
                stacklevel=2,
            )
        return cls(features, layers, VGG16_L1_DEFAULT_SCALE if scale is None else scale)

    def raw_map(self, clean: torch.Tensor, corrupted: torch.Tensor) -> torch.Tensor:
        n, _, height, width = clean.shape
        x = (torch.cat([clean, corrupted]) - self.mean) / self.std
        total = torch.zeros(n, 1, height, width, device=clean.device, dtype=torch.float32)
        for index, module in enumerate(self.features):
            x = module(x)
            if index in self._taps:
                distance = (x[:n] - x[n:]).abs().sum(dim=1, keepdim=True)  # eq. 1: L1 over channels
                total += F.interpolate(distance, size=(height, width), mode="bilinear", align_corners=False)
        return total / len(self._taps)

    def extra_repr(self) -> str:
        return f"layers={[LAYER_NAMES[b] for b in self.layers]}, scale={self.scale:g}"
