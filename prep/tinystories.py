"""TinyStories (roneneldan/TinyStories), TRAIN split: replay rows of the text a story model was pretrained on.

Not a skill to learn but the remedy against forgetting one: mixed into a fine-tune (``prep mix --tasks banking77
stories:300``), each row keeps the model writing stories while it learns the new task. A row is one story: its
first sentence is the prompt (plain text, no instruction: this is language modelling, not a task) and the next
sentences, up to ``CONTINUATION_CHARS``, the response, so the training loss falls on story text as in
pre-training. The cap keeps a replay row about as long as a task row: a whole story costs several times more to
train on (attention grows with the square of its length) and replays the same kind of text.

Published as ``TinyStories-train.txt`` (stories separated by ``<|endoftext|>``); the hub version has a ``text``
column. Only train-split stories belong here: forgetting is measured on held-out *validation* stories (the eval
probe ``tinystories``), which a test checks never occur in replay rows. A story model such as stories260k was
pretrained on this very split, so replay rows are text it has seen: that is what replay means.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from prep.common import DropRow, SourceRow, read_text, normalise_key, read_file_or_folder, require_text
from prep.task import RESPONSE, TaskSpec

SEPARATOR = "<|endoftext|>"  # between stories in the published .txt files
TEMPLATE = "{opening}"  # the story's first sentence, as it is: no instruction, so the rest is plain continuation
CONTINUATION_CHARS = 300  # the response: whole sentences after the first, up to this many characters
# The first sentence: up to the first . ! or ? (with a closing quote) followed by white space.
_FIRST_SENTENCE = re.compile(r"^(.+?[.!?][\"']?)\s+(?=\S)", re.S)


def read_stories(path: Path) -> list[SourceRow]:
    """The stories of a published ``.txt`` file, one row each (empty pieces between separators skipped)."""
    pieces = [piece.strip() for piece in read_text(path).split(SEPARATOR)]
    return [SourceRow({"text": piece}, f"{path}: story {i}") for i, piece in enumerate(pieces, start=1) if piece]


def read_local(path: Path) -> list[SourceRow]:
    """A ``.txt`` file in the published format, a folder holding one (``TinyStories-train.txt`` first), or any
    data file with a ``text`` column."""
    if path.is_dir():
        texts = sorted(path.glob("*.txt"), key=lambda p: (p.name != "TinyStories-train.txt", p.name))
        return read_stories(texts[0]) if texts else read_file_or_folder(path)
    return read_stories(path) if path.suffix.lower() == ".txt" else read_file_or_folder(path)


# A sentence end inside the continuation: . ! or ? (with a closing quote) followed by white space or the end.
_SENTENCE_END = re.compile(r"[.!?][\"']?(?=\s|$)")


def split_story(story: str, limit: int = CONTINUATION_CHARS) -> tuple[str, str]:
    """(first sentence, the whole sentences after it up to ``limit`` characters; at least one, however long).
    A story of one sentence has nothing to continue and is dropped. Pure."""
    match = _FIRST_SENTENCE.match(story)
    if match is None:
        raise DropRow("story of one sentence")
    rest = story[match.end():].strip()
    ends = [m.end() for m in _SENTENCE_END.finditer(rest)]
    within = [end for end in ends if end <= limit]
    cut = within[-1] if within else (ends[0] if ends else len(rest))
    return match.group(1).strip(), rest[:cut].strip()


def to_fields(row: SourceRow) -> dict[str, str]:
    opening, rest = split_story(require_text(row, "text"))
    return {"opening": opening, RESPONSE: rest}


def group_key(fields: Mapping[str, str]) -> str:
    return normalise_key(fields["opening"], fields[RESPONSE])


TASK = TaskSpec(
    name="stories",
    hub_name="roneneldan/TinyStories",
    template=TEMPLATE,
    read_local=read_local,
    to_fields=to_fields,
    group_key=group_key,
    hub_split="train",
    source_folder="tinystories",
    ludwig_config=None,  # a replay ingredient of a mixture (prep mix), not trained on its own
    scorer="text",
    primary_metric="rougeL",
)
