"""Small files in each dataset's published format, written by the tests (never copied from a real dataset)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from prep.banking77 import INTENTS
from workflow.samples import sql_rows


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _delimited(path: Path, header: list[str], rows: list[list[str]], delimiter: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def gpteacher(folder: Path, n: int = 100) -> Path:
    rows = [{"instruction": f"Explain step {i} of making tea.", "input": "" if i % 2 else f"cup {i}",
             "response": f"Step {i}: boil the water and wait {i} minutes."} for i in range(n)]
    rows.append(dict(rows[0]))  # a duplicate instruction+input: dropped
    path = folder / "gpt4-instruct-dedupe-only-dataset.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows), encoding="utf-8")
    return folder


def paradetox(folder: Path, n: int = 100) -> Path:
    rows = [[f"you are a stupid idiot number {i}", f"you are wrong, friend {i}", f"I disagree with you {i}" if i % 2 else "", ""]
            for i in range(n)]
    _delimited(folder / "paradetox.tsv", ["toxic", "neutral1", "neutral2", "neutral3"], rows, "\t")
    return folder


def sql_create_context(folder: Path, n: int = 100) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sql_create_context_v4.json").write_text(json.dumps(sql_rows(n)), encoding="utf-8")
    return folder


def spider(folder: Path, n: int = 6) -> Path:
    import sqlite3

    folder.mkdir(parents=True, exist_ok=True)
    schema = {"db_id": "concert", "table_names_original": ["singer"],
              "column_names_original": [[-1, "*"], [0, "Name"], [0, "Age"]], "column_types": ["text", "text", "number"],
              "primary_keys": [], "foreign_keys": []}
    (folder / "tables.json").write_text(json.dumps([schema]), encoding="utf-8")
    dev = [{"db_id": "concert", "question": f"Which singers are older than {20 + i}?",
            "query": f"SELECT Name FROM singer WHERE Age > {20 + i}"} for i in range(n)]
    (folder / "dev.json").write_text(json.dumps(dev), encoding="utf-8")
    db = folder / "database" / "concert" / "concert.sqlite"
    db.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(db) as conn:
        conn.executescript("CREATE TABLE singer (Name TEXT, Age INTEGER);"
                           "INSERT INTO singer VALUES ('Ann', 22), ('Bob', 31), ('Cyd', 45);")
    return folder


def banking77(folder: Path, n: int = 24) -> Path:
    rows = [[f"I have a question about my card, case {i}", INTENTS[i % 5]] for i in range(n)]
    _delimited(folder / "train.csv", ["text", "category"], rows, ",")
    _delimited(folder / "test.csv", ["text", "category"], [[f"Where is my card {i}?", "card_arrival"] for i in range(4)], ",")
    return folder


def commonsense_qa(folder: Path, n: int = 24) -> Path:
    def row(i: int, stem: str) -> dict:
        return {"answerKey": "ABCDE"[i % 5], "id": f"q{i}",
                "question": {"question_concept": "thing", "stem": f"{stem} {i}?",
                             "choices": [{"label": l, "text": f"option {l}{i}"} for l in "ABCDE"]}}
    _jsonl(folder / "train_rand_split.jsonl", [row(i, "Where would you put a thing") for i in range(n)])
    _jsonl(folder / "dev_rand_split.jsonl", [row(i, "What would you use to fix a thing") for i in range(6)])
    return folder


def samsum(folder: Path, n: int = 24) -> Path:
    def rows(prefix: str, count: int) -> list[dict]:
        return [{"id": f"{prefix}{i}", "dialogue": f"Amy: Lunch at {i} ({prefix})?\r\nBen: Sure, see you at {i}.",
                 "summary": f"Amy and Ben will have lunch at {i} ({prefix})."} for i in range(count)]
    _jsonl(folder / "train.jsonl", rows("tr", n))
    _jsonl(folder / "validation.jsonl", rows("va", 3))
    _jsonl(folder / "test.jsonl", rows("te", 4))
    return folder


def lamini_docs(folder: Path, n: int = 100) -> Path:
    _jsonl(folder / "lamini_docs.jsonl", [{"question": f"How do I call feature {i} of Lamini?",
                                           "answer": f"Use lamini.feature_{i}() after you log in."} for i in range(n)])
    return folder


def tinystories(folder: Path, n: int = 100) -> Path:
    """TinyStories-train.txt: stories separated by <|endoftext|> lines, as published."""
    folder.mkdir(parents=True, exist_ok=True)
    stories = [f"Tom found a red ball number {i}. He played with it all day.\nThen he went home." for i in range(n)]
    (folder / "TinyStories-train.txt").write_text("\n<|endoftext|>\n".join(stories) + "\n", encoding="utf-8")
    return folder


WRITERS = {
    "instruct": gpteacher, "detox": paradetox, "sql": sql_create_context, "spider": spider, "banking77": banking77,
    "commonsense_qa": commonsense_qa, "samsum": samsum, "lamini_docs": lamini_docs, "stories": tinystories,
}
