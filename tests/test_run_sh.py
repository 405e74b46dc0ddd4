"""run.sh: the one entry point's own behaviour (the commands behind it have their own tests)."""

from __future__ import annotations

import subprocess
from pathlib import Path

RUN_SH = Path(__file__).resolve().parent.parent / "run.sh"


def test_unknown_command_prints_the_usage_and_no_line_of_code() -> None:
    out = subprocess.run(["bash", str(RUN_SH), "no-such-command"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    assert lines[-1] == "error: unknown command 'no-such-command'"
    assert any(line.strip().startswith("./run.sh train <task>") for line in lines)
    assert not any("set -euo" in line or "ROOT=" in line or line.startswith("#") for line in lines)
