"""eval.inputs: template fields come back from kept columns or, where prep dropped them, from the prompt."""

from __future__ import annotations

from eval.inputs import input_text, row_fields, template_fields
from prep.registry import get_task


def test_fields_are_parsed_back_from_a_rendered_prompt() -> None:
    spec = get_task("samsum")
    fields = {"dialogue": "Amanda: I baked cookies. Do you want some?\nJerry: Sure!"}
    prompt = spec.render_prompt(fields)
    assert template_fields(spec.template, prompt) == fields
    assert template_fields(spec.template, "not this task's prompt") is None


def test_kept_columns_win_and_missing_fields_come_from_the_prompt() -> None:
    spec = get_task("sql")
    prompt = spec.render_prompt({"context": "CREATE TABLE head (age INTEGER)", "question": "How old?"})
    row = {"prompt": prompt, "response": "SELECT age FROM head", "question": "How old?"}
    assert row_fields(row, spec) == {"context": "CREATE TABLE head (age INTEGER)", "question": "How old?"}


def test_a_field_used_twice_must_match_and_odd_prompts_fall_back_to_the_whole_prompt() -> None:
    assert template_fields("{a} and {a}", "x and x") == {"a": "x"}
    assert template_fields("{a} and {a}", "x and y") is None
    spec = get_task("samsum")
    assert row_fields({"prompt": "free text"}, spec) == {"prompt": "free text"}


def test_input_text_is_the_non_empty_fields() -> None:
    assert input_text({"instruction": " Do it ", "input_block": ""}) == "Do it"
