"""Speed-ups for LLM fine-tuning inside the declarative workflow (issue: fast training on GPU).

Each speed-up is one small, idempotent patch applied from :func:`apply_all` (called by
``ludwig_mt.ludwig_fixes.apply_all``), on by default where it helps, and measured by the benchmark.
"""

from __future__ import annotations


def apply_all() -> None:
    """Apply every speed-up; safe to call many times."""
