"""Fine-tuning methods, one module each: a model plus its losses as a task returning a dict of named losses.

``METHODS`` maps a method name to the function that builds its task; entries are lazy, so listing them imports
neither torch nor open_clip. The entry's meta lists the loss names the task returns and its parameter groups, which a
config's stages can be checked against before anything is built.
"""

from __future__ import annotations

from robustfm.registry import Registry

METHODS: Registry = Registry("method")

METHODS.register_lazy(
    "cgclip",
    "robustfm.methods.cgclip:build_cgclip_task",
    losses=("contrastive", "corruption"),
    param_groups=("image_encoder", "text_encoder", "decoder"),
    config="robustfm.methods.cgclip_config:CGClipConfig",
    description="CG-CLIP (paper 000): CLIP + U-Net corruption decoder, contrastive + BCE losses",
)

__all__ = ["METHODS"]
