"""The one wrapper around the ``AutoModelForCausalLM`` that Ludwig's LLM loader calls (``ludwig.utils.llm_utils``).

Several patches change how Ludwig 0.17.10 loads a base model: the speed-ups (bf16 weights, SDPA instead of eager
attention, Liger kernels: :mod:`ludwig_mt.patches.speedups`) and the distributed placement (each rank's own GPU:
:mod:`ludwig_mt.patches.distributed`). Each registers its rule here with :func:`add_load_rule`; one stand-in applies
every rule, in registration order (the registry's order), so loading is patched in a single place instead of by a
stack of look-alike wrappers. Whichever of those patches comes first installs the stand-in; each declares its
target, ``ludwig.utils.llm_utils:AutoModelForCausalLM``, in the registry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from ludwig_mt.patches.core import rebind

TARGET = "ludwig.utils.llm_utils:AutoModelForCausalLM"

logger = logging.getLogger(__name__)

#: changes the ``from_pretrained`` keyword arguments Ludwig built; returns a new dict, never mutates its input
KwargsRule = Callable[[dict[str, Any]], dict[str, Any]]
#: runs on the loaded model (e.g. patches kernels into it)
AfterLoad = Callable[[Any], Any]

_KWARGS_RULES: list[KwargsRule] = []
_AFTER_LOAD: list[AfterLoad] = []


def apply_rules(kwargs: dict[str, Any], rules: Sequence[KwargsRule]) -> dict[str, Any]:
    """``kwargs`` changed by each rule in turn (pure)."""
    out = dict(kwargs)
    for rule in rules:
        out = rule(out)
    return out


class LudwigModelLoader:
    """Stands in for ``AutoModelForCausalLM`` inside ``ludwig.utils.llm_utils`` only.

    ``from_pretrained`` applies the registered keyword-argument rules, loads, then runs the after-load hooks; every
    other attribute is the real class's.
    """

    def __init__(self, real: Any, kwargs_rules: Sequence[KwargsRule] = _KWARGS_RULES,
                 after_load: Sequence[AfterLoad] = _AFTER_LOAD) -> None:
        self._real = real
        self._kwargs_rules = kwargs_rules
        self._after_load = after_load

    def from_pretrained(self, *args: Any, **kwargs: Any):
        new = apply_rules(kwargs, self._kwargs_rules)
        if new != kwargs:
            changed = {k: new.get(k) for k in set(new) | set(kwargs) if new.get(k) != kwargs.get(k)}
            logger.info("ludwig_mt: from_pretrained %s", changed)
        model = self._real.from_pretrained(*args, **new)
        for hook in self._after_load:
            hook(model)
        return model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def install() -> None:
    """Put :class:`LudwigModelLoader` in front of Ludwig's ``AutoModelForCausalLM`` (once)."""
    from ludwig.utils import llm_utils

    if not isinstance(llm_utils.AutoModelForCausalLM, LudwigModelLoader):
        rebind(TARGET, LudwigModelLoader)


def add_load_rule(kwargs_rule: KwargsRule | None = None, *, after_load: AfterLoad | None = None) -> None:
    """Register a rule (and/or an after-load hook) for every model Ludwig loads; registering twice is a no-op."""
    install()
    if kwargs_rule is not None and kwargs_rule not in _KWARGS_RULES:
        _KWARGS_RULES.append(kwargs_rule)
    if after_load is not None and after_load not in _AFTER_LOAD:
        _AFTER_LOAD.append(after_load)
