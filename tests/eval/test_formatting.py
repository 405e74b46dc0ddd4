"""eval.formatting: interval decimals follow the width, changes say "ns" when not significant, one cell format."""

from __future__ import annotations

from eval.formatting import cell_text, fmt_change, fmt_estimate, fmt_interval, interval_decimals, truncate
from eval.stats import Estimate


def test_interval_decimals_follow_the_width() -> None:
    assert interval_decimals(0.28, 0.37, 0.32) == 3  # width 0.09: two significant digits need 3 decimals
    assert interval_decimals(0.20, 0.45, 0.32) == 2
    assert interval_decimals(10.2, 21.3, 15.0) == 1
    assert interval_decimals(0.5, 0.5, 0.5) == 3 and interval_decimals(20.0, 20.0, 20.0) == 2


def test_estimates_and_changes_read_as_in_the_legend() -> None:
    score = Estimate(0.325, 0.28, 0.37, 400)
    assert fmt_estimate(score) == "0.325 [0.280, 0.370]"
    assert fmt_estimate(Estimate(0.5, None, None, 1)) == "0.500"
    gain = Estimate(0.322, 0.27, 0.37, 400, 0.001)
    assert fmt_change(gain, True) == "+0.322 [0.27, 0.37]"
    assert fmt_change(Estimate(0.003, -0.02, 0.03, 400, 0.7), False) == "+0.003 [-0.020, 0.030] ns"
    assert fmt_change(Estimate(-0.02, -0.03, -0.01, 400)) == "-0.020 [-0.030, -0.010]"  # judged by its interval
    assert fmt_change(Estimate(0.10, 0.05, 0.152, 50, 0.01), True, percent=True) == "+10.0 % [5.0, 15.2]"


def test_cell_text_puts_score_change_n_and_flags_in_that_order() -> None:
    text = cell_text(Estimate(0.325, 0.28, 0.37, 400), Estimate(0.322, 0.27, 0.37, 400, 0.001), True, ["≤bl"])
    assert text == "0.325 [0.280, 0.370] (+0.322 [0.27, 0.37]) n=400 ≤bl"
    assert cell_text(None, None, None) == "—"
    assert fmt_interval(None) == ""


def test_truncate_keeps_one_line_and_marks_the_cut() -> None:
    assert truncate("a\nb   c") == "a b c"
    assert truncate("x" * 100, 10) == "x" * 9 + "…"
