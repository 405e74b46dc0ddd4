"""The timed steps of the long commands (demo, study): one spinner line per step while it runs, one "done" line
with its seconds after, and the seconds kept for the one-screen summary."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from rich.console import Console

T = TypeVar("T")


def timed_steps(console: Console, timings: dict[str, float]) -> Callable[[str, Callable[[], Any]], Any]:
    """A ``step(name, fn)`` that runs ``fn`` under a spinner, records its seconds in ``timings[name]`` and says so."""

    def step(name: str, fn: Callable[[], T]) -> T:
        started = time.perf_counter()
        with console.status(f"[bold]{name}[/bold] ..."):
            value = fn()
        timings[name] = time.perf_counter() - started
        console.print(f"[green]done[/green] {name} ({timings[name]:.1f} s)")
        return value

    return step
