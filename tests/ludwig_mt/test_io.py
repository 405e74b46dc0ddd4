"""ludwig_mt.io: atomic writes leave either the old file or the whole new one, never half a file or a temp file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from ludwig_mt.io import atomic_path, atomic_write_csv


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    atomic_write_csv(target, pd.DataFrame({"a": [1]}))
    before = target.read_bytes()

    class Boom(pd.DataFrame):
        def to_csv(self, *args, **kwargs):  # type: ignore[override]
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write_csv(target, Boom({"a": [2]}))
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]  # no temp file left behind


def test_atomic_path_replaces_on_success_and_keeps_the_old_file_after_a_half_write(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"first")
    assert target.read_bytes() == b"first"
    with pytest.raises(RuntimeError, match="crash mid-write"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]  # no temp file left behind
