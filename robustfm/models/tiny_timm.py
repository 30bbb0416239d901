"""robustfm's tiny timm ViT, registered with timm's ``@register_model`` like timm's own ``test_vit``.

Importing this module imports timm; :mod:`robustfm.models.timm_classifier` imports it only when a model is built.
The model has the vision sizes of ``open_clip/tiny-vit`` (4 blocks, width 64, patch 8, 64 px -> 8x8 grid) and one
register token, so that the prefix-token handling of the token taps is exercised by the tests.
"""

from __future__ import annotations

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer

# timm's register_model reads the pretrained config of each entrypoint from its module's `default_cfgs`.
default_cfgs = {
    "robustfm_tiny_vit": dict(
        url="",
        num_classes=10,
        input_size=(3, 64, 64),
        pool_size=None,
        crop_pct=1.0,
        interpolation="bicubic",
        fixed_input_size=True,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv="patch_embed.proj",
        classifier="head",
        license="apache-2.0",
    ),
}


@register_model
def robustfm_tiny_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A 4-block, width-64 ViT on 64 px inputs with 10 classes, for tests and the CPU demo.

    No published weights exist; ``pretrained=True`` works only with a local file given through timm's
    ``pretrained_cfg_overlay=dict(file=...)``.
    """
    model_args = dict(patch_size=8, embed_dim=64, depth=4, num_heads=2, mlp_ratio=4.0, reg_tokens=1)
    return build_model_with_cfg(VisionTransformer, "robustfm_tiny_vit", pretrained, **dict(model_args, **kwargs))
