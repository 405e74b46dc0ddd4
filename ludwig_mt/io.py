"""Atomic file writes, shared by every layer that writes results (prep's CSVs, eval's reports and caches, rendered
configs, per-rank checkpoint partitions): a crash or an error never leaves half a file, and an existing file stays
as it was until the new one is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file in ``path``'s folder to write to; renamed onto ``path`` when the block succeeds, removed when
    it fails: a crash or an error never leaves half a file, and an existing ``path`` stays as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8, newlines as given) through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")


def atomic_write_csv(path: Path, frame: pd.DataFrame) -> None:
    """``frame`` as CSV without its index, ``\\n`` line ends on every platform (reruns are byte-identical)."""
    atomic_write_text(path, frame.to_csv(index=False, lineterminator="\n"))


def atomic_write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON with sorted keys (diff-friendly, byte-identical on reruns)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
