"""The machinery of the patch registry: the record type, the one wrap-and-rebind helper, the version guard.

Nothing here knows a patch; the table of patches is :mod:`ludwig_mt.patches`. This module imports only the
standard library, so the import hook (:mod:`ludwig_mt.autoload`, run at every interpreter start of the venv) and
``python -m ludwig_mt.patches`` stay cheap.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ludwig_mt.errors import WorkflowError
from ludwig_mt.patches.env import ENV_ALLOW_UNTESTED, env_flag

logger = logging.getLogger(__name__)

Kind = Literal["fix", "speed-up", "distributed", "instrumentation"]
KINDS: tuple[Kind, ...] = ("fix", "speed-up", "distributed", "instrumentation")

#: package -> the versions every patch was written and tested against: the pins of pyproject.toml and the lent GPU
#: image's (torch 2.11, transformers 5.17, peft 0.21, accelerate 1.15; Ludwig, bitsandbytes and DeepSpeed from the
#: pins). Ludwig is matched exactly: the patches reach into its internals, which any release may change. The others
#: by major.minor: a patch release of them does not rename or re-sign what the patches touch. A package that is not
#: installed is not checked (nothing can be patched in it; code that needs it fails at its import as it would anyway).
KNOWN_VERSIONS: dict[str, tuple[str, ...]] = {
    "ludwig": ("0.17.10",),
    "torch": ("2.14", "2.11"),
    "transformers": ("5.24", "5.17"),
    "peft": ("0.21",),
    "accelerate": ("1.15",),
    "bitsandbytes": ("0.50",),
    "deepspeed": ("0.19",),
}


@dataclass(frozen=True)
class Switch:
    """When a patch is applied: ``text`` says it in the table, ``on`` decides it at apply time."""

    text: str
    on: Callable[[], bool] = field(compare=False)


ALWAYS = Switch("always", lambda: True)
#: applied only when code asks for it by name (:func:`ludwig_mt.patches.apply`), never by ``apply_all``
EXPLICIT = Switch("explicit only", lambda: False)


def env_set(name: str, what: str) -> Switch:
    """On when the environment variable ``name`` is set to anything (``what`` names its value in the table)."""
    return Switch(f"`{name}={what}`", lambda: bool(os.environ.get(name)))


@dataclass(frozen=True)
class Patch:
    """One patch of Ludwig (or of transformers, peft, accelerate as Ludwig uses them): a row of the registry."""

    name: str
    targets: tuple[str, ...]  # every attribute it replaces, as ``module:Class.attr`` (or ``module:attr``)
    purpose: str  # one line: what goes wrong without it, or what it makes faster
    kind: Kind
    switch: Switch
    body: Callable[[], None] = field(compare=False, repr=False)  # applies it, through :func:`rebind` only
    packages: tuple[str, ...] = ("ludwig",)  # whose internals it relies on: the versions it was written against

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind {self.kind!r} is not one of {KINDS}")
        unknown = [p for p in self.packages if p not in KNOWN_VERSIONS]
        if unknown or not self.targets or any(":" not in t for t in self.targets):
            raise ValueError(f"{self.name}: targets must be module:attr, packages known ({unknown})")

    @property
    def versions(self) -> str:
        """The versions it was written against, as the table shows them (``x`` = any patch release)."""
        return "; ".join(f"{p} {' / '.join(v if v.count('.') > 1 else v + '.x' for v in KNOWN_VERSIONS[p])}"
                         for p in self.packages)


# ------------------------------------------------------------------------------------------------ the helper
_APPLIED: dict[str, None] = {}  # names of the patches applied in this process, in order
_LAYERS: dict[str, list[str]] = {}  # target -> the patches that rebound it, innermost first
_ORIGINALS: dict[str, Any] = {}  # target -> its value before any patch
_APPLYING: list[Patch] = []  # the patch whose body runs now


def resolve(target: str) -> tuple[Any, str]:
    """``"pkg.mod:Class.attr"`` -> (the object holding the attribute, its name); imports the module if needed.

    A module still being imported is taken from ``sys.modules`` (the import hook patches ``ludwig.cli`` while it
    loads, before ``ludwig`` has it as an attribute).
    """
    module_name, _, path = target.partition(":")
    owner: Any = sys.modules.get(module_name) or importlib.import_module(module_name)
    *parents, attr = path.split(".")
    for name in parents:
        owner = getattr(owner, name)
    if not hasattr(owner, attr):
        raise AttributeError(f"{target}: {type(owner).__name__} {getattr(owner, '__name__', owner)!r} has no {attr!r}")
    return owner, attr


def rebind(target: str, make: Callable[[Any], Any]) -> Any:
    """Replace the attribute ``target`` by ``make(current)`` and return the replacement: the one place the project
    assigns an attribute of Ludwig, transformers, peft or accelerate.

    ``current`` is what is there now: the original, or the layer of a patch applied before (so patches of the same
    attribute stack in the registry's order, recorded in :func:`layers`). A static method stays static. Allowed only
    while a registered patch that declares ``target`` is being applied, so the registry's table is complete.
    """
    patch = _APPLYING[-1] if _APPLYING else None
    if patch is None or target not in patch.targets:
        where = f"patch {patch.name!r}, which does not declare it" if patch else "no patch of the registry"
        raise RuntimeError(f"rebind({target!r}) from {where}: declare the target in ludwig_mt/patches/__init__.py")
    import inspect

    owner, attr = resolve(target)
    static = isinstance(inspect.getattr_static(owner, attr), staticmethod)
    current = getattr(owner, attr)
    replacement = make(current)
    _ORIGINALS.setdefault(target, current)
    setattr(owner, attr, staticmethod(replacement) if static else replacement)
    _LAYERS.setdefault(target, []).append(patch.name)
    return replacement


def original(target: str) -> Any:
    """What ``target`` was before any patch of this process replaced it (the current value if none did)."""
    if target in _ORIGINALS:
        return _ORIGINALS[target]
    owner, attr = resolve(target)
    return getattr(owner, attr)


def layers() -> dict[str, list[str]]:
    """target -> the patches that replaced it in this process, innermost (applied first) to outermost."""
    return {target: list(names) for target, names in _LAYERS.items()}


def applied() -> list[str]:
    """The patches applied in this process, in the order they were applied."""
    return list(_APPLIED)


@contextlib.contextmanager
def applying(patch: Patch) -> Iterator[None]:
    """Inside the block :func:`rebind` may replace ``patch``'s targets (for the registry, and for tests that
    exercise a patch's building blocks)."""
    _APPLYING.append(patch)
    try:
        yield
    finally:
        _APPLYING.pop()


def apply_patch(patch: Patch) -> bool:
    """Apply ``patch`` unless this process already did (or is doing it: a target's module imported by its body
    re-enters the import hook); check the installed versions first. True if applied now."""
    if patch.name in _APPLIED or any(p.name == patch.name for p in _APPLYING):
        return False
    guard_versions()
    with applying(patch):
        patch.body()
    _APPLIED[patch.name] = None
    return True


# ------------------------------------------------------------------------------------------ the version guard
class UntestedVersionError(WorkflowError):
    """An installed package is outside :data:`KNOWN_VERSIONS`: the patches could fail or silently misbehave."""


def release(text: str) -> tuple[int, ...]:
    """``"2.11.0+cu130"`` -> ``(2, 11, 0)``: the numeric release, without local or pre-release suffixes."""
    match = re.match(r"\d+(?:\.\d+)*", text.strip())
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def is_known(installed: str, known: tuple[str, ...]) -> bool:
    """Whether ``installed`` matches one of ``known``: every component a known entry gives (``0.17.10`` exactly,
    ``2.11`` any 2.11.x)."""
    have = release(installed)
    return any(have[:len(release(k))] == release(k) for k in known)


def installed_versions(packages: tuple[str, ...] = tuple(KNOWN_VERSIONS)) -> dict[str, str | None]:
    """package -> its installed version from the package metadata (None when not installed); imports nothing."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for package in packages:
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def version_problem(installed: Mapping[str, str | None],
                    known: Mapping[str, tuple[str, ...]] = KNOWN_VERSIONS) -> str | None:
    """The one line that names every installed package outside ``known`` (installed and known versions) and the
    way out; None when all are known. Pure."""
    bad = [f"{p} {v} (known: {', '.join(known[p])})" for p, v in installed.items()
           if v is not None and p in known and not is_known(v, known[p])]
    if not bad:
        return None
    return (f"untested versions: {'; '.join(bad)}. The project's Ludwig patches are written against the known ones "
            f"(python -m ludwig_mt.patches lists them). Fix: install the versions pinned in pyproject.toml, or set "
            f"{ENV_ALLOW_UNTESTED}=1 to apply the patches anyway")


_VERSIONS_CHECKED: list[bool] = []


def guard_versions() -> None:
    """Stop with :class:`UntestedVersionError` (one line) on an installed version outside the known set, unless
    ``LUDWIG_MT_ALLOW_UNTESTED_VERSIONS=1`` (then one warning); checked once per process."""
    if _VERSIONS_CHECKED:
        return
    problem = version_problem(installed_versions())
    if problem is not None:
        if not env_flag(ENV_ALLOW_UNTESTED):
            raise UntestedVersionError(problem)
        logger.warning("ludwig_mt: %s; applying them anyway (%s=1)", problem.split(". ")[0], ENV_ALLOW_UNTESTED)
    _VERSIONS_CHECKED.append(True)
