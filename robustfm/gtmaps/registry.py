"""The ground-truth map registry. Lazy entries: listing names or reading a default scale imports no torch.

Meta of each entry:
- ``default_scale``: the fixed normalisation scale (see :mod:`robustfm.gtmaps.base`) used when a config gives none,
  fitted for the default layers with :func:`robustfm.gtmaps.fit.fit_map_scale` as documented there;
- ``description``: what the map measures.
"""

from __future__ import annotations

from robustfm.registry import Registry

GT_MAPS: Registry = Registry("ground-truth map")

# Fitted with robustfm.gtmaps.fit: quantile 0.99 of raw map values over scikit-image's 7 colour photos at 224 px under
# the 9 CG-CLIP "seen" corruptions at severities 1-5 (315 pairs); see that module for the procedure and how to refit.
# `python -m robustfm.gtmaps.fit --weights hed` printed 1549 with eq. 1's sum over channels (12.37 with the channel
# mean used before; HED's VGG-16 is the only real VGG-16 available offline) and `--mapper pixel_l1` printed 0.453.
# Recipes fit their own scale at run time for the configured weights (gt_map.scale: null); this default serves
# direct callers of build_gt_mapper.
VGG16_L1_DEFAULT_SCALE = 1549.0
PIXEL_L1_DEFAULT_SCALE = 0.453

GT_MAPS.register_lazy(
    "vgg16_l1",
    "robustfm.gtmaps.vgg:VGGFeatureMapper",
    default_scale=VGG16_L1_DEFAULT_SCALE,
    default_layers=(1, 2, 3, 4, 5),
    description="CG-CLIP eq. 1: sum over channels of |VGG-16 features(clean) - features(corrupted)| after "
    "relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, bilinearly upsampled and averaged over the chosen layers",
)
GT_MAPS.register_lazy(
    "pixel_l1",
    "robustfm.gtmaps.pixel:PixelL1Mapper",
    default_scale=PIXEL_L1_DEFAULT_SCALE,
    default_layers=None,
    description="mean over RGB channels of |clean - corrupted| in [0,1] pixels: a cheap, model-free map",
)
