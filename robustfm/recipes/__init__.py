"""Recipes: one readable top-to-bottom file per method (set-up -> train -> evaluate -> export), on the recipe kit.

``RECIPES`` maps a recipe name to its ``run(cfg)``; each recipe's config module (``robustfm/recipes/<name>_config.py``,
imported on the first lookup and light: no torch, no ray) registers it with its config class (meta ``config``), its
default config file (``default_config``) and, when it can be swept, its sweep adapter (``sweep``, a lazy
``"module:attr"``; see :class:`robustfm.sweeps.recipes.SweepableRecipe`). Adding a method adds files; it edits none.
"""

from __future__ import annotations

from typing import Any

from robustfm.registry import Registry

RECIPES: Registry[Any] = Registry("recipe", discover="robustfm.recipes", discover_pattern="*_config")

__all__ = ["RECIPES"]
