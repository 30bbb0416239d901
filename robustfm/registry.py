"""One name -> implementation registry, shared by every component family.

Models, corruptions, perturbations, ground-truth maps, methods, recipes and evaluation suites each own a
:class:`Registry`. Entries are either objects registered with the decorator next to their code, or lazy
``"package.module:attr"`` strings that are imported only on first lookup, so that listing names never imports
torch, ray or open_clip.

Example::

    CORRUPTIONS = Registry("corruption")

    @CORRUPTIONS.register("gaussian_noise", severities=(0.08, 0.12, 0.18, 0.26, 0.38))
    def gaussian_noise(images, severity, generator): ...

    CORRUPTIONS.register_lazy("fog", "robustfm.corruptions.weather:fog")
    CORRUPTIONS.get("gausian_noise")  # KeyError: unknown corruption 'gausian_noise'; did you mean 'gaussian_noise'?

A registry can also *discover* its entries: ``Registry("evaluation suite", discover="robustfm.evals.suites")``
imports every module of that package (or those matching ``discover_pattern``, e.g. ``"*_config"``) the first time a
name is looked up or listed, and each module registers itself. Adding a component is then adding one file: nothing
else lists it. Discovered modules must be light at import time (no torch, ray or model building).
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import pkgutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name that no entry of a registry carries. The message lists the closest names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0])


def did_you_mean(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest of ``choices``, or ``""`` when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?"


def import_target(target: str) -> Any:
    """Import ``"package.module:attr"`` (attr may be dotted) and return the attribute."""
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(f"lazy registry target {target!r} must look like 'package.module:attr'")
    obj: Any = importlib.import_module(module_name)
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class _Entry:
    target: Any  # the object, or a "module:attr" string until first lookup
    meta: dict[str, Any] = field(default_factory=dict)
    loaded: bool = False


class Registry(Generic[T]):
    """A named family of components.

    Args:
        family: what the entries are, used in error messages ("corruption", "model", ...).
        discover: a package whose modules register entries of this registry when imported; they are imported on the
            first lookup or listing (None: entries are registered explicitly).
        discover_pattern: which modules of ``discover`` to import (``fnmatch`` on the module name).
    """

    def __init__(self, family: str, discover: str | None = None, discover_pattern: str = "*") -> None:
        self.family = family
        self._entries: dict[str, _Entry] = {}
        self._discover = discover
        self._discover_pattern = discover_pattern
        self._discovered = discover is None

    def _ensure_discovered(self) -> None:
        if self._discovered:
            return
        self._discovered = True  # set first: a discovered module may look names up while it registers
        package = importlib.import_module(self._discover)
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            if not info.name.startswith("_") and fnmatch.fnmatch(info.name, self._discover_pattern):
                importlib.import_module(f"{self._discover}.{info.name}")

    def register(self, name: str, obj: T | None = None, **meta: Any) -> Any:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator.

        ``meta`` holds static facts about the entry (a severity table, a metric direction, ...) that can be read
        with :meth:`meta` without importing anything.
        """
        if obj is not None:
            self._add(name, _Entry(obj, dict(meta), loaded=True))
            return obj

        def decorator(fn: T) -> T:
            self._add(name, _Entry(fn, dict(meta), loaded=True))
            return fn

        return decorator

    def register_lazy(self, name: str, target: str, **meta: Any) -> None:
        """Register ``"package.module:attr"``, imported on the first :meth:`get`."""
        if ":" not in target:
            raise ValueError(f"lazy {self.family} {name!r}: target {target!r} must look like 'package.module:attr'")
        self._add(name, _Entry(target, dict(meta), loaded=False))

    def _add(self, name: str, entry: _Entry) -> None:
        existing = self._entries.get(name)
        # Re-registering the lazy placeholder with the real object (the module registering itself on import) is
        # expected; two different objects under one name is a bug.
        if existing is not None and existing.loaded and entry.loaded and existing.target is not entry.target:
            raise ValueError(f"{self.family} {name!r} is already registered")
        if existing is not None and not entry.meta:
            entry.meta = existing.meta
        self._entries[name] = entry

    def unregister(self, name: str) -> None:
        """Remove ``name`` (e.g. a component a test registered for its own duration)."""
        self._lookup(name)
        del self._entries[name]

    def get(self, name: str) -> T:
        """Return the implementation registered as ``name``, importing it if it is lazy."""
        entry = self._lookup(name)
        if not entry.loaded:
            entry.target = import_target(entry.target)
            entry.loaded = True
        return entry.target

    def meta(self, name: str) -> Mapping[str, Any]:
        """Static facts registered with ``name`` (read-only)."""
        return MappingProxyType(self._lookup(name).meta)

    def names(self) -> list[str]:
        """All registered names, sorted."""
        self._ensure_discovered()
        return sorted(self._entries)

    def check(self, name: str) -> str:
        """Raise :class:`UnknownNameError` unless ``name`` is registered; return it. Imports nothing."""
        self._lookup(name)
        return name

    def _lookup(self, name: str) -> _Entry:
        self._ensure_discovered()
        try:
            return self._entries[name]
        except KeyError:
            hint = did_you_mean(name, self.names())
            raise UnknownNameError(
                f"unknown {self.family} {name!r}{hint} (registered: {', '.join(self.names()) or 'none'})"
            ) from None

    def __contains__(self, name: object) -> bool:
        self._ensure_discovered()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._ensure_discovered()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.family!r}, {len(self)} entries)"
