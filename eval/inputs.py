"""What a prepared row's input was: its template fields, from the kept columns or parsed back from the prompt.

The trivial baselines copy the input (``eval.baselines``) and the contamination check compares inputs across
training and test sets (``eval.contamination``); both need the fields a prompt was rendered from. prep keeps only
some of them as CSV columns (``TaskSpec.keep_columns``, e.g. sql's ``question`` and ``context``); the others are
recovered from the prompt with the task's own template, so nothing has to be re-prepared.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from functools import cache

from prep.task import PROMPT, RESPONSE, TaskSpec


@cache
def template_pattern(template: str) -> re.Pattern[str]:
    """A regex that matches exactly the prompts ``template`` renders, one named group per field (a field used
    twice must hold the same text both times)."""
    parts, seen = [r"\A"], set()
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name:
            parts.append(f"(?P={name})" if name in seen else f"(?P<{name}>.*?)")
            seen.add(name)
    parts.append(r"\Z")
    return re.compile("".join(parts), re.DOTALL)


def template_fields(template: str, prompt: str) -> dict[str, str] | None:
    """The fields ``prompt`` was rendered from with ``template``, or None when it was not rendered with it."""
    match = template_pattern(template).match(prompt)
    return match.groupdict() if match else None


def field_names(template: str) -> list[str]:
    return list(dict.fromkeys(name for _, name, _, _ in string.Formatter().parse(template) if name))


def row_fields(row: Mapping[str, str], spec: TaskSpec) -> dict[str, str]:
    """The template fields of one prepared row (not the response): kept columns first, the rest from the prompt;
    a prompt that does not fit the template gives its whole text as the one field ``prompt``."""
    names = field_names(spec.template)
    fields = {name: str(row[name]) for name in names if name in row}
    if len(fields) < len(names):
        parsed = template_fields(spec.template, str(row.get(PROMPT, "")))
        if parsed is None:
            return {PROMPT: str(row.get(PROMPT, ""))}
        fields = {name: fields.get(name, parsed[name]) for name in names}
    return {k: v for k, v in fields.items() if k != RESPONSE}


def input_text(fields: Mapping[str, str]) -> str:
    """Everything the user gave the model, without the template's fixed text: the non-empty fields, one a line."""
    return "\n".join(v.strip() for v in fields.values() if v.strip())
