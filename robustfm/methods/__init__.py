"""Fine-tuning methods, one module each: a model plus its losses as a task returning a dict of named losses.

``METHODS`` maps a method name to the function ``build(model: ModelConfig, settings) -> task``; entries are lazy and
registered by the method's config module, so listing them imports neither torch nor open_clip. The entry's meta lists
the loss names the task returns, its parameter groups and what it ``needs`` from the strategy beyond one plain
backward (:data:`robustfm.train.capabilities.CAPABILITIES`, e.g.
``double_backward_input``), which a config's stages and strategy can be checked against before anything is built
(``check_capabilities(cfg.train, METHODS.meta(name)["needs"], prefix="train")``).
"""

from __future__ import annotations

from robustfm.registry import Registry

METHODS: Registry = Registry("method", discover="robustfm.methods", discover_pattern="*_config")
"""Each method's config module (``robustfm/methods/<name>_config.py``, light: no torch) registers its task builder
here with its meta (``losses``, ``param_groups``, ``needs``, ``config``): adding a method edits no other file."""

__all__ = ["METHODS"]
