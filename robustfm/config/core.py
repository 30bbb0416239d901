"""Typed, immutable configs: dataclass schemas <- YAML <- dotted ``key.sub=value`` overrides.

Schemas are ``@dataclass(frozen=True)`` classes whose attributes carry docstrings. Values are checked against the
type annotations while the config is built, and each schema's ``__post_init__`` checks its own invariants with
:func:`check`, so that every error names the full dotted field and the bad value, before anything touches Ray.

Supported annotations: ``int``, ``float``, ``str``, ``bool``, ``X | None``, ``Literal[...]``, ``tuple[X, ...]``
(YAML lists become tuples), ``dict[str, X]`` (an immutable, ordered :class:`FrozenDict`), nested dataclasses, and
:class:`RegistrySections` subclasses (name -> section, each name's schema registered with the component it configures).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union

import yaml

from robustfm.registry import Registry, did_you_mean, import_target

T = TypeVar("T")
_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


class ConfigError(ValueError):
    """A config value that is missing, of the wrong type, or out of range.

    Attributes:
        field: the full dotted path of the field (``stages.tune.lr``).
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)

    def under(self, prefix: str) -> ConfigError:
        """The same error with ``prefix`` prepended to its field path."""
        if not prefix:
            return self
        return ConfigError(f"{prefix}.{self.field}" if self.field else prefix, self.message)


def check(condition: bool, field: str, value: Any, requirement: str) -> None:
    """Raise :class:`ConfigError` for ``field`` unless ``condition`` holds. Use in ``__post_init__``."""
    if not condition:
        raise ConfigError(field, f"{requirement}, got {value!r}")


class FrozenDict(dict):
    """An ordered mapping that cannot be changed after construction (and still pickles for Ray)."""

    def _readonly(self, *args: Any, **kwargs: Any) -> typing.NoReturn:
        raise TypeError("config mappings are immutable; use robustfm.config.replace_path to derive a new config")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _readonly  # type: ignore[assignment]
    __ior__ = _readonly  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (dict(self),))

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(self.items()))


class RegistrySections(FrozenDict):
    """Config sections keyed by the names of a registry, each with the schema its entry registered (meta ``config``:
    a dataclass or a lazy ``"module:Class"``), so that a new component brings its own config and no central schema
    lists it. Every registered name gets a section: its default unless the config gives one.

    Subclasses set :attr:`registry`. Example: ``EvalConfig.suites`` (``eval.suites.zero_shot.data.max_samples=12``).
    """

    registry: ClassVar[Registry]

    @classmethod
    def schema_for(cls, name: str, path: str) -> type:
        """The config schema registered for ``name``; an unknown name fails naming the dotted field."""
        if name not in cls.registry:
            hint = did_you_mean(name, cls.registry.names())
            raise ConfigError(
                f"{path}.{name}",
                f"unknown {cls.registry.family} {name!r}{hint} (registered: {', '.join(cls.registry.names())})",
            )
        schema = cls.registry.meta(name)["config"]
        return import_target(schema) if isinstance(schema, str) else schema

    @classmethod
    def build(cls, value: Mapping[str, Any] | None = None, path: str = "") -> RegistrySections:
        """Every registered name -> its section: ``value[name]`` (plain data or a built section) or the default."""
        value = {} if value is None else value
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping of {cls.registry.family} names to settings, got {value!r}")
        sections = {}
        for name in cls.registry.names():
            schema = cls.schema_for(name, path)
            given = value.get(name)
            sections[name] = given if isinstance(given, schema) else from_dict(schema, given, f"{path}.{name}")
        for name in value:
            cls.schema_for(str(name), path)  # unknown names raise with a suggestion
        return cls(sections)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (dict(self),))


# --- building a dataclass from plain data -------------------------------------------------------------------------


def from_dict(schema: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build ``schema`` from nested plain data, checking types and rejecting unknown keys."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(path, f"expected a mapping of fields for {schema.__name__}, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    for key in data:
        if key not in fields:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(where, f"unknown key for {schema.__name__}{did_you_mean(str(key), list(fields))}")
    hints = typing.get_type_hints(schema)
    kwargs = {}
    for name in fields:
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{path}.{name}" if path else name)
    try:
        return schema(**kwargs)
    except ConfigError as err:
        raise err.under(path) from None
    except TypeError as err:  # a required field without a value
        raise ConfigError(path, f"{schema.__name__}: {err}") from None


def _coerce(value: Any, annotation: Any, path: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, path)
            except ConfigError as err:
                errors.append(err.message)
        raise ConfigError(path, "; ".join(errors))
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(
                path, f"must be one of {choices}, got {value!r}{did_you_mean(str(value), [str(a) for a in args])}"
            )
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        return from_dict(annotation, value, path)
    if isinstance(annotation, type) and issubclass(annotation, RegistrySections):
        return annotation.build(value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(path, f"expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin in (dict, Mapping, typing.Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping, got {value!r}")
        key_type, value_type = args or (str, Any)
        return FrozenDict({_coerce(k, key_type, path): _coerce(v, value_type, f"{path}.{k}") for k, v in value.items()})
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str) and _SCIENTIFIC.match(value):  # YAML 1.1 reads 1e-6 (no dot) as a string
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"{path}: unsupported config annotation {annotation!r}")


def to_dict(config: Any) -> Any:
    """Plain nested data (dicts, lists, scalars) of a config, in field order."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, Mapping):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, Path):
        return str(config)
    return config


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values. Accepts a config or plain data."""
    data = to_dict(data)
    if not isinstance(data, Mapping):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


# --- merging YAML and overrides ---------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"stages.tune.lr=1e-5"`` -> (``["stages", "tune", "lr"]``, ``1e-5``). Values are parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(key or text, f"override {text!r} must look like 'key.sub=value'")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.split("."), value


def set_path(data: dict[str, Any], keys: Sequence[str], value: Any) -> None:
    """Set ``data[k0][k1]...[kn] = value``, creating intermediate mappings."""
    node = data
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            raise ConfigError(".".join(keys[: i + 1]), f"is a value ({child!r}), not a section with keys")
        node = child
    node[keys[-1]] = value


def deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``; mappings merge, everything else replaces. An empty
    mapping replaces too: ``ood: {}`` in a file that ``extends`` another clears the base file's entries."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and value and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file; ``extends: other.yaml`` (relative to the file) pulls in a base file first."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"config file {str(path)!r} does not exist")
    with path.open() as handle:
        try:
            data = yaml.safe_load(handle) or {}
        except yaml.YAMLError as err:
            raise ConfigError("", f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: a config file must hold a mapping at its top level")
    base = data.pop("extends", None)
    if base is not None:
        data = deep_merge(read_yaml(path.parent / base), data)
    return data


def load_config(
    schema: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
) -> T:
    """Resolve a config: schema defaults <- ``base`` <- YAML file <- ``key.sub=value`` overrides (in order).

    Raises:
        ConfigError: naming the dotted field and the bad value, before any resource is touched.
    """
    data: dict[str, Any] = copy.deepcopy(dict(base or {}))  # overrides must never write into the caller's dicts
    if path is not None:
        data = deep_merge(data, read_yaml(path))
    for text in overrides:
        keys, value = parse_override(text)
        set_path(data, keys, value)
    return from_dict(schema, data)


def replace_path(config: T, dotted: str, value: Any) -> T:
    """A new config equal to ``config`` but with ``dotted`` set to ``value`` (validated like an override)."""
    return replace_paths(config, {dotted: value})


def replace_paths(config: T, changes: Mapping[str, Any]) -> T:
    """A new config with every ``dotted: value`` of ``changes`` set, validated once after all of them: fields that
    are only valid together (a probe mode and the file it needs) change in one step."""
    data = to_dict(config)
    for dotted, value in changes.items():
        set_path(data, dotted.split("."), value)
    return from_dict(type(config), data)
