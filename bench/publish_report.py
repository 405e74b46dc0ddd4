"""Copy an eval report folder for committing: report.md, report.json and retention.png, with the sample outputs of
tasks whose licence forbids redistributing derivatives (samsum: CC BY-NC-ND 4.0) left out.

    python bench/publish_report.py runs/study-scored2/study docs/study [--omit samsum]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

NO_SAMPLES = ("samsum",)  # CC BY-NC-ND 4.0


def strip_markdown(text: str, omit: tuple[str, ...]) -> str:
    """report.md without the "Sample outputs" table of each omitted task's section (up to its next heading)."""
    out, section, skipping = [], None, False
    for line in text.splitlines():
        if line.startswith("#"):
            section, skipping = line.lstrip("# ").strip(), False
        if section in omit and line.startswith("Sample outputs"):
            out.append(f"Sample outputs: omitted in this committed copy ({section}'s licence forbids "
                       "redistributing derivatives; the report eval writes shows them).")
            skipping = True
            continue
        if not skipping:
            out.append(line)
    return "\n".join(out) + "\n"


def strip_json(data: dict, omit: tuple[str, ...]) -> dict:
    samples = data.get("samples", {})
    for task in omit:
        if task in samples:
            samples[task] = {"omitted": "licence forbids redistributing derivatives; the report eval writes has them"}
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--omit", default=",".join(NO_SAMPLES), help="tasks whose samples are left out")
    args = parser.parse_args()
    omit = tuple(t for t in args.omit.split(",") if t)
    args.target.mkdir(parents=True, exist_ok=True)
    (args.target / "report.md").write_text(strip_markdown((args.source / "report.md").read_text(), omit))
    data = strip_json(json.loads((args.source / "report.json").read_text()), omit)
    (args.target / "report.json").write_text(json.dumps(data, indent=1))
    shutil.copy(args.source / "retention.png", args.target / "retention.png")


if __name__ == "__main__":
    main()
