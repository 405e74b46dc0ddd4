"""How numbers read in the report, the terminal summary and the heatmap (one place, so the three agree).

A cell reads ``0.325 [0.28, 0.37] (+0.322 [0.27, 0.37]) n=400``: the score and its 95 % interval, the change from
the base and its paired interval, the rows. Intervals get as many decimals as their width needs (two significant
digits of the width), so a tight interval is not rounded to a point and a wide one does not pretend precision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from eval.stats import Estimate

DASH = "—"
NOT_SIGNIFICANT = "ns"
BELOW_BASELINE = "≤bl"
LEGEND = (
    "Cell: score [95 % bootstrap interval] (change from the base [95 % paired interval]) n=rows. "
    f"`{NOT_SIGNIFICANT}` = no significant change: the interval includes 0, or the change does not survive "
    "Benjamini-Hochberg false-discovery control at 5 % over every change tested. "
    f"`{BELOW_BASELINE}` = not significantly above the task's trivial baseline. "
    "`⚠ a ↑ b ↓` = the task's metrics disagree in direction. `seen k` = k test rows overlap the model's training "
    "data. **bold** = a task the adapter was trained on."
)


def fmt(value: float | None) -> str:
    """Scores on a 0-1 scale get 3 decimals, larger scales (chrF, perplexity) 2; missing is an em dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.3f}"


def fmt_delta(value: float | None) -> str:
    return DASH if value is None else ("+" if value >= 0 else "-") + fmt(abs(value))


def fmt_percent(value: float | None) -> str:
    return DASH if value is None else f"{value * 100:+.1f} %"


def interval_decimals(low: float, high: float, value: float) -> int:
    """Two significant digits of the interval's width, between 1 and 4 decimals."""
    width = high - low
    if width <= 1e-5 * max(1.0, abs(value)) or not math.isfinite(width):  # a point (up to float32 rounding)
        return 3 if abs(value) < 10 else 2
    return min(4, max(1, 1 - math.floor(math.log10(width))))


def fmt_interval(estimate: Estimate | None, scale: float = 1.0) -> str:
    """``[low, high]`` (times ``scale``: 100 for percentages), or '' when there is no interval."""
    if estimate is None or not estimate.has_interval:
        return ""
    low, high = estimate.low * scale, estimate.high * scale  # type: ignore[operator]
    digits = interval_decimals(low, high, estimate.value * scale) if scale == 1.0 or high - low > 1e-3 else 1
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def fmt_estimate(estimate: Estimate | None) -> str:
    """``0.325 [0.28, 0.37]``; the bare value when there is no interval."""
    if estimate is None:
        return DASH
    return " ".join(part for part in (fmt(estimate.value), fmt_interval(estimate)) if part)


def fmt_change(estimate: Estimate | None, significant: bool | None = None, *, percent: bool = False) -> str:
    """``+0.322 [0.27, 0.37]`` or ``+10.0 % [5.1, 15.2]``, with ``ns`` when not significant (``significant``
    None: judged by the interval alone, as for the summary digests)."""
    if estimate is None:
        return DASH
    head = fmt_percent(estimate.value) if percent else fmt_delta(estimate.value)
    text = " ".join(part for part in (head, fmt_interval(estimate, 100.0 if percent else 1.0)) if part)
    claim = significant if significant is not None else not estimate.includes_zero()
    return text if claim else f"{text} {NOT_SIGNIFICANT}"


def cell_text(score: Estimate | None, change: Estimate | None, significant: bool | None,
              flags: Sequence[str] = (), *, percent: bool = False) -> str:
    """One matrix cell: score, change in parentheses (adapters only), n, then any flags."""
    parts = [fmt_estimate(score)]
    if change is not None:
        parts.append(f"({fmt_change(change, significant, percent=percent)})")
    if score is not None and score.n:
        parts.append(f"n={score.n}")
    return " ".join([*parts, *flags])


def truncate(text: str, limit: int = 80) -> str:
    """One line, at most ``limit`` characters (an ellipsis marks the cut)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 1] + "…"
