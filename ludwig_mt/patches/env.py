"""The environment variables that switch the patches, read the same way in every process.

Only ``os``: the import hook (:mod:`ludwig_mt.autoload`) reads :data:`ENV_NO_FIXES` at every interpreter start of
the venv, before anything else of the project is imported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

#: raw Ludwig: no patch of any kind is applied, in any process (the regression tests and the "raw" benchmarks)
ENV_NO_FIXES = "LUDWIG_MT_NO_FIXES"
#: patches left out by name, in any process (comma-separated names from the registry's table)
ENV_PATCHES_OFF = "LUDWIG_MT_PATCHES_OFF"
#: apply the patches on versions they were not written against (the version guard then only warns)
ENV_ALLOW_UNTESTED = "LUDWIG_MT_ALLOW_UNTESTED_VERSIONS"


def env_flag(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment variable ``name`` is set to a true value (1, true, yes, on)."""
    value = (os.environ if environ is None else environ).get(name, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def env_names(name: str, environ: Mapping[str, str] | None = None) -> set[str]:
    """The comma-separated names in the environment variable ``name`` (empty when unset)."""
    value = (os.environ if environ is None else environ).get(name, "")
    return {part.strip() for part in value.split(",") if part.strip()}
