"""Where a ``ludwig`` command line names its config: read by the launcher and by the ``ludwig`` command's own
key check (:mod:`ludwig_mt.patches.fixes`). Standard library only, so the patches can use it without importing the
launcher (which applies the patches: the import would run in a circle)."""

from __future__ import annotations

from collections.abc import Sequence


def config_path_in(ludwig_args: Sequence[str]) -> str | None:
    """The value of ``--config``/``-c`` in a ``ludwig train`` command line, if any."""
    args = list(ludwig_args)
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None
