"""``python -m ludwig_mt.patches``: the registry's table on stdout (the README's table is this output), then the
installed versions checked against the known set: one line on stderr, exit 2 when one is outside it (unless
``LUDWIG_MT_ALLOW_UNTESTED_VERSIONS=1``)."""

from __future__ import annotations

import sys

from ludwig_mt.patches.core import installed_versions, version_problem
from ludwig_mt.patches.env import ENV_ALLOW_UNTESTED, env_flag
from ludwig_mt.patches.registry import render_table


def main() -> int:
    print(render_table(), end="")
    installed = installed_versions()
    problem = version_problem(installed)
    if problem is None:
        found = ", ".join(f"{p} {v}" for p, v in installed.items() if v is not None)
        print(f"installed versions are known: {found}", file=sys.stderr)
        return 0
    print(f"{'warning' if env_flag(ENV_ALLOW_UNTESTED) else 'error'}: {problem}", file=sys.stderr)
    return 0 if env_flag(ENV_ALLOW_UNTESTED) else 2


if __name__ == "__main__":
    raise SystemExit(main())
