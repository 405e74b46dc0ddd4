"""Apply :mod:`ludwig_mt.ludwig_fixes` the moment Ludwig is imported, in any Python process of the venv.

``./run.sh setup`` writes ``ludwig_mt_fixes.pth`` into the venv's site-packages with the single line
``import ludwig_mt.autoload``. Python runs it at start-up; it only registers an import hook (cheap: Ludwig itself
is not imported), and the fixes run right after ``ludwig.cli`` or ``ludwig.api`` finishes loading. This is why the
plain ``ludwig`` command needs no wrapper script and no manual step.

Install by hand (a venv not made by run.sh): ``python -m ludwig_mt.autoload install``.
Set ``LUDWIG_MT_NO_FIXES=1`` to run raw Ludwig (the regression tests and benchmarks use it to show what breaks).
"""

from __future__ import annotations

import importlib.abc
import os
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "ludwig_mt_fixes.pth"
WATCHED = {"ludwig.cli", "ludwig.api"}


def _after_load(name: str) -> None:
    from ludwig_mt import ludwig_fixes

    if name == "ludwig.cli":
        ludwig_fixes.one_line_errors_in_cli()
    else:
        ludwig_fixes.apply_all()


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, wrapped: importlib.abc.Loader, name: str) -> None:
        self._wrapped, self._name = wrapped, name

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module) -> None:
        self._wrapped.exec_module(module)
        _after_load(self._name)


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
        _after_load(name)


def install_pth(site_packages: Path | None = None) -> Path:
    """Write the ``.pth`` file that runs this hook in every process of the current interpreter's environment."""
    target = (site_packages or Path(sysconfig.get_paths()["purelib"])) / PTH_NAME
    target.write_text("import ludwig_mt.autoload\n", encoding="utf-8")
    return target


if os.environ.get("LUDWIG_MT_NO_FIXES", "") not in ("1", "true"):
    install_hook()

if __name__ == "__main__" and sys.argv[1:] == ["install"]:
    print(install_pth())
