"""Fitting the fixed normalisation scale of a ground-truth map on data.

The rule (see :mod:`robustfm.gtmaps.base`) is ``map = clip(raw / scale, 0, 1)``. We pick ``scale`` as a high quantile
(default 0.99) of the raw per-pixel values of corrupted images: the strongest 1% of corrupted pixels saturate at 1,
every weaker difference keeps its relative strength, and the same constant serves training and evaluation.

How the registry defaults were fitted (``python -m robustfm.gtmaps.fit``): the bundled real photos (scikit-image's
astronaut, chelsea, coffee, rocket, hubble_deep_field, immunohistochemistry, retina) resized to 224 px, each
corrupted with every CG-CLIP "seen" corruption at severities 1-5 (robustfm.corruptions, per-sample seeds), raw maps
over the default layers 1..5, quantile 0.99 over all pixels. For ``vgg16_l1`` the network was the only real VGG-16
that can be had offline, HED's (ImageNet VGG-16 fine-tuned for edges; :mod:`robustfm.gtmaps.hed`). Another
network (torchvision's ``IMAGENET1K_V1``), other layers or another corruption mix change the raw magnitudes: refit
with ``python -m robustfm.gtmaps.fit --weights IMAGENET1K_V1`` and set ``gt_map.scale`` to the printed value.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from robustfm.gtmaps.base import GTMapper

MAX_VALUES_PER_PAIR = 4096  # a deterministic subsample per batch keeps torch.quantile within its input limits


def fit_map_scale(
    mapper: GTMapper, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], quantile: float = 0.99
) -> float:
    """The ``quantile`` of raw map values over all (clean, corrupted) batches in ``pairs``.

    Pairs whose corrupted image equals the clean one are skipped (their all-zero maps say nothing about scale).
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    values = []
    for clean, corrupted in pairs:
        changed = ~(clean == corrupted).flatten(1).all(dim=1)
        if not changed.any():
            continue
        raw = mapper.raw(clean[changed], corrupted[changed]).flatten()
        stride = max(1, raw.numel() // MAX_VALUES_PER_PAIR)
        values.append(raw[::stride].float().cpu())
    if not values:
        raise ValueError("fit_map_scale: no pair had a corrupted image different from its clean image")
    return float(torch.quantile(torch.cat(values), quantile))


SATURATED_SHARE = 0.05
"""A map config whose corrupted-image pixels sit at 1 more often than this is saturated: the target loses detail."""
FAINT_QUANTILE_VALUE = 0.05
"""A map config whose 99th-percentile corrupted-image pixel is below this is faint: the target is nearly all zero."""


@dataclass(frozen=True)
class ScaleCheck:
    """How a scale spreads the maps of a sample of corrupted images over [0, 1]."""

    scale: float
    saturated_share: float
    """Share of corrupted-image pixels at 1."""
    high_quantile: float
    """The 99th-percentile map value of corrupted-image pixels."""
    images: int

    @property
    def problem(self) -> str | None:
        """A sentence for the warning, or None when the maps use the range."""
        if self.saturated_share > SATURATED_SHARE:
            return (
                f"{self.saturated_share:.1%} of corrupted-image pixels saturate at 1 with scale {self.scale:g} "
                f"(over {self.images} images; more than {SATURATED_SHARE:.0%}): raise gt_map.scale or set it to null"
            )
        if self.high_quantile < FAINT_QUANTILE_VALUE:
            return (
                f"the maps nearly vanish with scale {self.scale:g}: their 99th percentile is {self.high_quantile:.3g} "
                f"(over {self.images} images; below {FAINT_QUANTILE_VALUE}): lower gt_map.scale or set it to null"
            )
        return None


def check_scale(mapper: GTMapper, clean: torch.Tensor, corrupted: torch.Tensor, scale: float) -> ScaleCheck:
    """Saturation and faintness of ``clip(raw / scale, 0, 1)`` on the changed pairs of a batch."""
    changed = ~(clean == corrupted).flatten(1).all(dim=1)
    maps = (mapper.raw(clean[changed], corrupted[changed]) / scale).clamp(0, 1).flatten().float()
    stride = max(1, maps.numel() // (MAX_VALUES_PER_PAIR * 16))
    return ScaleCheck(
        scale=float(scale),
        saturated_share=float((maps >= 1).float().mean()),
        high_quantile=float(torch.quantile(maps[::stride], 0.99)),
        images=int(changed.sum()),
    )


def corruption_pairs(
    photos: torch.Tensor,
    corruption_names: Sequence[str],
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    run_seed: int = 0,
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """(clean, corrupted) batches: all ``photos`` under each corruption and severity, with per-sample seeds."""
    from robustfm.corruptions import corrupt_batch
    from robustfm.seeding import sample_seed

    count = photos.shape[0]
    for name in corruption_names:
        for severity in severities:
            seeds = [sample_seed(f"fit/{i}", 0, f"{name}/{severity}", run_seed) for i in range(count)]
            yield photos, corrupt_batch(photos, [name] * count, [severity] * count, seeds)


def calibration_photos(size: int) -> torch.Tensor:
    """The bundled colour photos of scikit-image, resized (area) to ``size`` square, float [0,1] (7, 3, size, size)."""
    import numpy as np
    import torch.nn.functional as F
    from skimage import data

    names = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
    photos = []
    for name in names:
        array = np.ascontiguousarray(getattr(data, name)()[..., :3])
        image = torch.from_numpy(array).permute(2, 0, 1).float().div(255)[None]
        photos.append(F.interpolate(image, size=(size, size), mode="area")[0])
    return torch.stack(photos)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fit a ground-truth map's normalisation scale on real photos.")
    parser.add_argument("--mapper", default="vgg16_l1", help="GT_MAPS name")
    parser.add_argument("--weights", default=None, help="VGG weights (torchvision name or path); 'hed' = HED's VGG-16")
    parser.add_argument("--layers", default="1,2,3,4,5", help="comma-separated conv blocks (vgg16_l1 only)")
    parser.add_argument("--corruptions", default="seen", help="a CORRUPTION_SETS name")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--quantile", type=float, default=0.99)
    args = parser.parse_args(argv)

    from robustfm.corruptions import CORRUPTION_SETS
    from robustfm.gtmaps import build_gt_mapper

    weights = args.weights
    if weights == "hed":
        from robustfm.gtmaps.hed import CONVERTED_NAME, default_cache_dir, load_hed_vgg16_state_dict

        load_hed_vgg16_state_dict()
        weights = str(default_cache_dir() / CONVERTED_NAME)
    layers = tuple(int(b) for b in args.layers.split(",")) if args.mapper == "vgg16_l1" else None
    mapper = build_gt_mapper(args.mapper, weights=weights, layers=layers, scale=1.0)
    from tqdm import tqdm

    names = CORRUPTION_SETS[args.corruptions]
    pairs = corruption_pairs(calibration_photos(args.size), names)
    scale = fit_map_scale(mapper, tqdm(pairs, total=5 * len(names), desc="corruption x severity"), args.quantile)
    print(
        f"{args.mapper} weights={args.weights} layers={layers} corruptions={args.corruptions} size={args.size} "
        f"quantile={args.quantile}: scale = {scale:.4g}"
    )


if __name__ == "__main__":
    main()
