"""workflow/demo.py: the terminal shows the demo's own progress and summary, not library chatter."""

from __future__ import annotations

import logging

from transformers.utils import logging as hf_logging

from workflow.demo import quiet_library_chatter


def test_quiet_library_chatter_silences_torch_deprecations_and_transformers_bars() -> None:
    pytree = logging.getLogger("torch.utils._pytree")
    level, bars = pytree.level, hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.enable_progress_bar()
        pytree.setLevel(logging.NOTSET)
        quiet_library_chatter()
        assert not hf_logging.is_progress_bar_enabled()
        assert not pytree.isEnabledFor(logging.WARNING)
    finally:
        pytree.setLevel(level)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
