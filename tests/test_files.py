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


def test_the_next_write_removes_the_temporary_files_a_killed_run_left_but_not_a_live_ones(
    tmp_path: Path,
) -> None:
    """Before: SIGKILL during `merge` left `.model.safetensors.tmp-*` behind for good."""
    import fcntl

    target = tmp_path / "model.safetensors"
    dead = tmp_path / ".model.safetensors.tmp-0badf00d"  # its writer was killed: nobody holds its lock
    dead.write_bytes(b"half a model")
    live = tmp_path / ".model.safetensors.tmp-5ca1ab1e"  # another process is writing it right now
    live.write_bytes(b"being written")
    other = tmp_path / ".other.safetensors.tmp-0badf00d"  # another target's: not this write's business
    other.write_bytes(b"x")
    with open(live, "rb") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        write_text_atomic(target, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, other.name])


def test_a_folder_is_replaced_as_a_whole_or_not_at_all(tmp_path: Path) -> None:
    from automerge.files import replaced_folder

    out = tmp_path / "export"
    with replaced_folder(out) as staged:
        (staged / "recipe.yaml").write_text("trial 1")
        (staged / "model.safetensors").write_text("model 1")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "recipe.yaml"]

    with pytest.raises(KeyboardInterrupt), replaced_folder(out) as staged:
        (staged / "recipe.yaml").write_text("trial 2")
        raise KeyboardInterrupt  # before: recipe.yaml was trial 2's and model.safetensors trial 1's
    assert (out / "recipe.yaml").read_text() == "trial 1" and (
        out / "model.safetensors"
    ).read_text() == "model 1"

    with replaced_folder(out) as staged:
        (staged / "recipe.yaml").write_text("trial 3")
    assert [p.name for p in out.iterdir()] == ["recipe.yaml"]  # nothing of trial 1 is left
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary folder either


def test_a_temporary_folder_left_by_a_killed_export_is_removed_by_the_next(tmp_path: Path) -> None:
    from automerge.files import WRITING, replaced_folder

    stale = tmp_path / ".export.tmp-0badf00d"
    stale.mkdir()
    (stale / WRITING).write_text("")
    (stale / "model.safetensors").write_text("half")
    with replaced_folder(tmp_path / "export") as staged:
        (staged / "recipe.yaml").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
