"""The generic registry: eager and lazy entries, metadata, listing, and errors with suggestions."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import pytest

from robustfm.config.core import RegistrySections
from robustfm.registry import Registry, UnknownNameError, did_you_mean, import_target


def test_register_decorator_and_get():
    reg: Registry = Registry("corruption")

    @reg.register("gaussian_noise", severities=(0.08, 0.12))
    def gaussian_noise(x):
        return x + 1

    assert reg.get("gaussian_noise") is gaussian_noise
    assert reg.meta("gaussian_noise")["severities"] == (0.08, 0.12)
    assert "gaussian_noise" in reg and len(reg) == 1
    with pytest.raises(TypeError):
        reg.meta("gaussian_noise")["severities"] = ()  # metadata is read-only


def test_unknown_name_suggests_the_closest():
    reg: Registry = Registry("corruption")
    for name in ("gaussian_noise", "shot_noise", "motion_blur"):
        reg.register(name, object())
    with pytest.raises(UnknownNameError) as err:
        reg.get("gausian_noise")
    message = str(err.value)
    assert "unknown corruption 'gausian_noise'" in message
    assert "did you mean 'gaussian_noise'" in message
    with pytest.raises(UnknownNameError, match="registered: gaussian_noise, motion_blur, shot_noise"):
        reg.check("zzz")


def test_lazy_entry_imports_only_on_get(tmp_path, monkeypatch):
    module = tmp_path / "lazy_registry_target_mod.py"
    module.write_text("VALUE = 42\nclass Thing:\n    answer = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg: Registry = Registry("suite")
    reg.register_lazy("value", "lazy_registry_target_mod:VALUE", direction="higher")
    reg.register_lazy("answer", "lazy_registry_target_mod:Thing.answer")
    assert reg.names() == ["answer", "value"]
    assert reg.meta("value")["direction"] == "higher"
    assert "lazy_registry_target_mod" not in sys.modules
    assert reg.get("value") == 42
    assert reg.get("answer") == 7


def test_lazy_target_must_name_module_and_attribute():
    reg: Registry = Registry("model")
    with pytest.raises(ValueError, match="package.module:attr"):
        reg.register_lazy("x", "robustfm.registry")
    with pytest.raises(ValueError, match="package.module:attr"):
        import_target("robustfm.registry:")


def test_two_objects_under_one_name_is_an_error():
    reg: Registry = Registry("model")
    reg.register("a", object())
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", object())


def test_lazy_placeholder_keeps_meta_when_module_registers_itself():
    reg: Registry = Registry("corruption")
    reg.register_lazy("fog", "math:pi", severities=(1, 2))
    reg.register("fog", 3.0)  # the module registering its real object on import
    assert reg.get("fog") == 3.0
    assert reg.meta("fog")["severities"] == (1, 2)


def test_did_you_mean_is_empty_when_nothing_is_close():
    assert did_you_mean("xyz", ["gaussian_noise"]) == ""


def test_discovery_imports_each_module_of_a_package_once_and_only_when_needed(tmp_path, monkeypatch):
    package = tmp_path / "discovered_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from robustfm.registry import Registry\n"
        "THINGS = Registry('thing', discover='discovered_pkg', discover_pattern='*_entry')\n"
    )
    (package / "alpha_entry.py").write_text("from discovered_pkg import THINGS\nTHINGS.register('alpha', 1, size=3)\n")
    (package / "beta_entry.py").write_text("from discovered_pkg import THINGS\nTHINGS.register('beta', 2)\n")
    (package / "helpers.py").write_text("raise RuntimeError('not an entry module: must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    things = importlib.import_module("discovered_pkg").THINGS
    assert "discovered_pkg.alpha_entry" not in sys.modules  # nothing imported until a name is needed
    assert things.names() == ["alpha", "beta"]
    assert things.get("alpha") == 1 and things.meta("alpha")["size"] == 3
    with pytest.raises(UnknownNameError, match="did you mean 'beta'"):
        things.get("betta")
    things.unregister("beta")
    assert "beta" not in things and len(things) == 1


@dataclass(frozen=True)
class _Small:
    size: int = 1


_WIDGETS: Registry = Registry("widget")
_WIDGETS.register("small", object(), config=_Small)
_WIDGETS.register_lazy("ray", "robustfm.config.schema:RayConfig", config="robustfm.config.schema:RayConfig")


class _Widgets(RegistrySections):
    registry = _WIDGETS


@dataclass(frozen=True)
class _Holder:
    widgets: _Widgets = field(default_factory=_Widgets.build)


def test_registry_sections_give_each_name_its_own_schema():
    from robustfm.config import ConfigError, from_dict

    built = from_dict(_Holder, {"widgets": {"small": {"size": 3}}})
    assert built.widgets["small"] == _Small(3) and built.widgets["ray"].num_cpus is None  # defaults filled in
    assert _Holder().widgets["small"] == _Small()
    with pytest.raises(ConfigError, match=r"widgets\.smal: unknown widget 'smal'; did you mean 'small'"):
        from_dict(_Holder, {"widgets": {"smal": {}}})
    with pytest.raises(ConfigError, match=r"widgets\.small\.size: expected an integer"):
        from_dict(_Holder, {"widgets": {"small": {"size": "big"}}})
