"""ParaDetox (s-nlp/paradetox): rewrite a toxic sentence politely, keeping its meaning.

Published as paradetox.tsv with columns toxic, neutral1, neutral2, neutral3 (1-3 rewrites per toxic sentence);
the hub has one (en_toxic_comment, en_neutral_comment) pair per row. Each (toxic, neutral) pair is a training
example; the split is drawn by hashing the toxic sentence, so its rewrites never straddle train and test. In
test.csv each toxic sentence appears once with all its rewrites in ``references`` (multi-reference BLEU/chrF).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from prep.common import DropRow, SourceRow, normalise_key, read_file_or_folder, require_text
from prep.task import RESPONSE, TaskSpec

TEMPLATE = (
    "### Task: Rewrite the toxic sentence so that it is polite and neutral but keeps its meaning.\n"
    "### Toxic:\n{source}\n### Neutral:\n"
)
HUB_COLUMNS = ("en_toxic_comment", "en_neutral_comment")


def read_local(path: Path) -> list[SourceRow]:
    return read_file_or_folder(path, ("paradetox.tsv",))


def to_fields(row: SourceRow) -> list[dict[str, str]]:
    if HUB_COLUMNS[0] in row.data:  # the hub's one-pair-per-row form
        return [{"source": require_text(row, HUB_COLUMNS[0]), RESPONSE: require_text(row, HUB_COLUMNS[1])}]
    toxic = require_text(row, "toxic")
    require_text(row, "neutral1", allow_empty=True)  # the column must exist, even if a row leaves it empty
    rewrites = [require_text(row, k, allow_empty=True) for k in ("neutral1", "neutral2", "neutral3") if k in row.data]
    pairs = [{"source": toxic, RESPONSE: neutral} for neutral in rewrites if neutral]
    if not pairs:
        raise DropRow("toxic sentence without any rewrite")
    return pairs


def group_key(fields: Mapping[str, str]) -> str:
    return normalise_key(fields["source"])


TASK = TaskSpec(
    name="detox",
    hub_name="s-nlp/paradetox",
    template=TEMPLATE,
    read_local=read_local,
    to_fields=to_fields,
    group_key=group_key,
    keep_columns=("source",),
    hub_split="train",
    one_test_row_per_group=True,
    source_folder="paradetox",
    ludwig_config="detox.yaml",
    scorer="detox",
    primary_metric="J",
)
