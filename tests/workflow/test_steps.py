"""workflow.steps: the timed steps the demo and the study share."""

from __future__ import annotations

import io

from rich.console import Console

from workflow.steps import timed_steps


def test_a_step_returns_its_value_keeps_its_seconds_and_says_it_is_done() -> None:
    out, timings = io.StringIO(), {}
    step = timed_steps(Console(file=out, width=80), timings)
    assert step("prep sql", lambda: 41 + 1) == 42
    assert list(timings) == ["prep sql"] and timings["prep sql"] >= 0
    assert "done prep sql (" in out.getvalue()
