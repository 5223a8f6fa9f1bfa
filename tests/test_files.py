"""Atomic writes: all or nothing, the umask's permissions (not mkstemp's 0600)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from automerge.files import atomic_writer, write_text_atomic


def test_a_write_replaces_the_file_with_the_umask_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "recipe.yaml", "a: 1\n")
    finally:
        os.umask(old)
    assert (tmp_path / "recipe.yaml").read_text() == "a: 1\n"
    assert stat.S_IMODE((tmp_path / "recipe.yaml").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.yaml"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_writer(target) as file:
        file.write(b"half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
