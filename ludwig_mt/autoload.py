"""Apply the patch registry (:mod:`ludwig_mt.patches.registry`) the moment Ludwig is imported, in any Python
process of the venv.

``./run.sh setup`` writes ``ludwig_mt_fixes.pth`` into the venv's site-packages with the single line
``import ludwig_mt.autoload``. Python runs it at start-up; it only registers an import hook (cheap: Ludwig itself
is not imported), which checks the installed versions before ``ludwig.cli`` or ``ludwig.api`` loads (one line and
exit 2 on an untested one, before Ludwig's slow import) and applies the patches right after it. This is why the
plain ``ludwig`` command needs no wrapper script and no manual step; the launcher's workers install the same hook.

Install by hand (a venv not made by run.sh): ``python -m ludwig_mt.autoload install``.
Set ``LUDWIG_MT_NO_FIXES=1`` to run raw Ludwig (the regression tests and benchmarks use it to show what breaks):
then no hook is installed and ``apply_all`` applies nothing, in every process alike.
"""

from __future__ import annotations

import importlib.abc
import sys
import sysconfig
from pathlib import Path

from ludwig_mt.patches.env import ENV_NO_FIXES, env_flag

PTH_NAME = "ludwig_mt_fixes.pth"
WATCHED = {"ludwig.cli", "ludwig.api"}


def _after_load(name: str) -> None:
    from ludwig_mt.patches import registry

    registry.apply_all(registry.CLI_PATCHES if name == "ludwig.cli" else None)


def _guard_versions() -> None:
    from ludwig_mt.patches.core import guard_versions

    guard_versions()


def _stopping_on_untested_versions(step) -> None:
    """Run ``step``; an installed version outside the known set ends the process with one line (exit 2)."""
    from ludwig_mt.patches.core import UntestedVersionError

    try:
        step()
    except UntestedVersionError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, wrapped: importlib.abc.Loader, name: str) -> None:
        self._wrapped, self._name = wrapped, name

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module) -> None:
        _stopping_on_untested_versions(_guard_versions)
        self._wrapped.exec_module(module)
        _stopping_on_untested_versions(lambda: _after_load(self._name))


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds the watched modules through the normal finders and runs the fixes after they execute."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, fullname)
                return spec
        return None


def install_hook() -> None:
    """Register the hook (idempotent); if Ludwig is already imported, apply the fixes now."""
    if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())
    for name in sorted(WATCHED & set(sys.modules)):
        _stopping_on_untested_versions(lambda: _after_load(name))


def install_pth(site_packages: Path | None = None) -> Path:
    """Write the ``.pth`` file that runs this hook in every process of the current interpreter's environment."""
    target = (site_packages or Path(sysconfig.get_paths()["purelib"])) / PTH_NAME
    target.write_text("import ludwig_mt.autoload\n", encoding="utf-8")
    return target


if not env_flag(ENV_NO_FIXES):
    install_hook()

if __name__ == "__main__" and sys.argv[1:] == ["install"]:
    print(install_pth())
