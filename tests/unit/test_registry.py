"""The generic registry: eager and lazy entries, metadata, listing, and errors with suggestions."""

from __future__ import annotations

import sys

import pytest

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
