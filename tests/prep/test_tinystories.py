"""prep/tinystories.py: TinyStories train stories become replay rows (opening -> a few sentences of continuation)."""

from __future__ import annotations

from pathlib import Path

import pytest

from prep.common import DropRow
from prep.tinystories import CONTINUATION_CHARS, read_local, split_story


def test_split_story_keeps_whole_sentences_up_to_the_limit() -> None:
    story = 'Tom had a ball. It was red! "Look," he said. Then he went home and slept for a long time.'
    assert split_story(story, 30) == ("Tom had a ball.", 'It was red! "Look," he said.')
    assert split_story(story) == ("Tom had a ball.", story[len("Tom had a ball. "):])  # all of it fits 300
    assert split_story("Tom ran. " + "x" * 50 + ".", 10) == ("Tom ran.", "x" * 50 + ".")  # one sentence at least
    assert len(split_story("A b. " + "Cc dd. " * 100)[1]) <= CONTINUATION_CHARS


def test_a_story_of_one_sentence_is_dropped() -> None:
    with pytest.raises(DropRow, match="one sentence"):
        split_story("Tom had a ball")


def test_published_txt_is_read_one_story_per_row(tmp_path: Path) -> None:
    path = tmp_path / "TinyStories-train.txt"
    path.write_text("First story. It ends.\n<|endoftext|>\n\n<|endoftext|>\nSecond story. Also ends.\n", encoding="utf-8")
    rows = read_local(tmp_path)
    assert [r.data["text"] for r in rows] == ["First story. It ends.", "Second story. Also ends."]
    assert rows[1].where == f"{path}: story 3"  # the empty piece between separators is skipped, counted in where
