"""ludwig_mt/patches/model_loading.py: one stand-in for Ludwig's AutoModelForCausalLM applies every registered rule."""

from __future__ import annotations

from typing import Any

from ludwig_mt.patches import core, model_loading, registry


class FakeAutoModel:
    loaded: list[dict[str, Any]] = []
    config_class = "the real attribute"

    @classmethod
    def from_pretrained(cls, name: str, **kwargs: Any) -> dict[str, Any]:
        cls.loaded.append(kwargs)
        return {"name": name}


def test_rules_apply_in_order_then_after_load_hooks_see_the_model() -> None:
    seen: list[Any] = []
    rules = [lambda kw: {**kw, "dtype": "bf16"}, lambda kw: {**kw, "dtype": kw["dtype"] + "!", "extra": 1}]
    loader = model_loading.LudwigModelLoader(FakeAutoModel, kwargs_rules=rules, after_load=[seen.append])
    original = {"device_map": "auto"}
    model = loader.from_pretrained("m", **original)
    assert FakeAutoModel.loaded[-1] == {"device_map": "auto", "dtype": "bf16!", "extra": 1}
    assert original == {"device_map": "auto"}, "rules never mutate Ludwig's kwargs"
    assert seen == [model] == [{"name": "m"}]
    assert loader.config_class == "the real attribute"


def test_apply_rules_is_pure_and_identity_without_rules() -> None:
    kwargs = {"a": 1}
    assert model_loading.apply_rules(kwargs, []) == kwargs
    assert model_loading.apply_rules(kwargs, []) is not kwargs


def test_install_wraps_ludwig_once_and_rules_register_once(monkeypatch) -> None:
    from ludwig.utils import llm_utils

    monkeypatch.setattr(llm_utils, "AutoModelForCausalLM", FakeAutoModel)
    monkeypatch.setattr(model_loading, "_KWARGS_RULES", [])
    monkeypatch.setattr(model_loading, "_AFTER_LOAD", [])
    monkeypatch.setattr(core, "_LAYERS", {})
    monkeypatch.setattr(core, "_ORIGINALS", {})

    def rule(kwargs: dict[str, Any]) -> dict[str, Any]:
        return {**kwargs, "ruled": True}

    with core.applying(registry.get("bf16_weights")):  # a patch that declares the loader as its target
        model_loading.add_load_rule(rule)
        model_loading.add_load_rule(rule)
        model_loading.install()
    assert isinstance(llm_utils.AutoModelForCausalLM, model_loading.LudwigModelLoader)
    assert llm_utils.AutoModelForCausalLM._real is FakeAutoModel, "wrapped once, not a wrapper of a wrapper"
    assert model_loading._KWARGS_RULES == [rule]
