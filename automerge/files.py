"""Files automerge writes: output folders checked before any work, atomic writes, and paths written
relative to the file that names them.

An atomic write goes to a temporary file beside the target (``.<name>.tmp-XXXXXXXX``, created with mode
0o666 so the umask gives the final file the usual permissions), is flushed and fsynced, then renamed
onto the target: a reader never sees half a file, and a crash or an error leaves the old file as it was.
The writer holds an advisory lock (``flock``) on its temporary file while it writes, so the next write
to the same target removes the temporary files that a killed run left (no process holds their lock).

A folder written as a whole (``replaced_folder``: a study's export) is built in a temporary sibling
``.<name>.tmp-XXXXXXXX/`` and then swapped with the old folder in one rename (Linux
``renameat2(RENAME_EXCHANGE)``; elsewhere two renames): it always holds the files of one run.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from automerge.errors import ConfigError

CACHE_DIR_VARIABLE = "AUTOMERGE_CACHE_DIR"


def cache_dir() -> Path:
    """automerge's cache folder: ``$AUTOMERGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/automerge``, else
    ``~/.cache/automerge`` (not created here)."""
    folder = os.environ.get(CACHE_DIR_VARIABLE)
    if folder:
        return Path(folder)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "automerge"


def writable_folder(folder: Path, *, fix: str) -> Path:
    """Create ``folder`` (and its parents) if needed and check that files can be written into it;
    else ``ConfigError`` naming the folder, the reason and ``fix`` (e.g. "pass another -o DIR")."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create folder {folder}: {error.strerror or error}; {fix}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write into folder {folder}: permission denied; {fix}")
    return folder


def check_creatable(folder: Path, *, fix: str) -> None:
    """``ConfigError`` unless ``folder`` exists as a writable folder or could be created (its nearest
    existing ancestor is a writable folder); creates nothing, so inputs can be checked first."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is" if existing == folder else f"cannot be created: {existing} is"
        raise ConfigError(f"folder {folder} {what} a file, not a folder; {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write into folder {existing}: permission denied; {fix}")


def relative_path(path: Path, folder: Path) -> str:
    """``path`` as a file in ``folder`` names it (POSIX separators), so that the folder and the files
    can move together; absolute where no relative path exists (another Windows drive)."""
    try:
        return Path(os.path.relpath(path.absolute(), folder.absolute())).as_posix()
    except ValueError:
        return str(path.absolute())


try:
    import fcntl
except ImportError:  # Windows: no advisory locks; stale temporary files are then left for the user
    fcntl = None  # type: ignore[assignment]

WRITING = ".writing"
"""The lock file inside a temporary folder (``replaced_folder``) while it is being written."""


def _lock(fd: int) -> bool:
    """Take an exclusive advisory lock on ``fd`` without waiting: False when another process holds it."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _abandoned(temp: Path) -> bool:
    """True when no process writes ``temp`` (a temporary file or folder) any more: its lock is free."""
    lock = temp / WRITING if temp.is_dir() else temp
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return temp.is_dir()  # a folder whose writer died before or after its lock file existed
    except OSError:
        return False
    try:
        return _lock(fd)
    finally:
        os.close(fd)


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary files and folders that killed runs left beside ``path``
    (``.<name>.tmp-*``, ``.<name>.old-*``) and that no live process is writing; returns them."""
    removed = []
    if fcntl is None or not path.parent.is_dir():
        return removed
    for candidate in path.parent.glob(f".{glob_escape(path.name)}.*-*"):
        kind = candidate.name[len(path.name) + 2 :].split("-", 1)[0]
        if kind not in ("tmp", "old") or not (kind == "old" or _abandoned(candidate)):
            continue
        try:
            if candidate.is_dir() and not candidate.is_symlink():
                shutil.rmtree(candidate)
            else:
                candidate.unlink()
        except OSError:
            continue  # another run removed it first, or it is not ours to remove
        removed.append(candidate)
    return removed


def glob_escape(name: str) -> str:
    """``name`` with glob's special characters taken literally."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def create_temp_beside(path: Path) -> tuple[Path, BinaryIO]:
    """A new temporary file ``.<name>.tmp-XXXXXXXX`` in ``path``'s folder, open for binary writing
    (``O_EXCL``, mode 0o666 before the umask) and locked while open; the stale ones that killed runs
    left beside ``path`` are removed first. Raises ``OSError`` when it cannot be created."""
    remove_stale_temps(path)
    while True:
        temp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        _lock(fd)
        return temp, os.fdopen(fd, "wb")


def commit_temp(temp: Path, file: BinaryIO, path: Path) -> None:
    """Flush, fsync and close ``file``, rename ``temp`` onto ``path`` and persist the rename."""
    file.flush()
    os.fsync(file.fileno())
    file.close()
    os.replace(temp, path)
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Persist a rename in ``folder`` (POSIX); folders cannot be opened this way on Windows."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """``with atomic_writer(path) as file: file.write(...)``: ``path`` is replaced only when the block
    ends without an exception; otherwise the temporary file is deleted and ``path`` is untouched."""
    path = Path(path)
    temp, file = create_temp_beside(path)
    try:
        yield file
        commit_temp(temp, file, path)
    except BaseException:
        file.close()
        temp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_writer(path) as file:
        file.write(text.encode("utf-8"))


def foreign_files(folder: Path, ours: Collection[str]) -> list[str]:
    """The names in ``folder`` that are not ``ours`` nor automerge's temporary files."""
    if not folder.is_dir():
        return []
    return sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.name not in ours and not any(f".{name}.tmp-" in entry.name for name in ours)
    )


@contextmanager
def replaced_folder(folder: Path) -> Iterator[Path]:
    """``with replaced_folder(out) as staged: write files into staged``: on a clean exit the staged
    folder replaces ``out`` as a whole (what was in ``out`` is removed); on an exception ``out`` is left
    as it was and the staged folder is removed. Temporary folders that killed runs left are removed
    first."""
    folder = Path(folder)
    remove_stale_temps(folder)
    staged = folder.parent / f".{folder.name}.tmp-{secrets.token_hex(4)}"
    staged.mkdir()
    lock = os.open(staged / WRITING, os.O_WRONLY | os.O_CREAT, 0o666)
    _lock(lock)
    try:
        yield staged
        os.unlink(staged / WRITING)
        _swap_in(staged, folder)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    finally:
        os.close(lock)


def _swap_in(staged: Path, folder: Path) -> None:
    """Put ``staged`` where ``folder`` is, in one step where the system can."""
    if not folder.exists():
        os.rename(staged, folder)
    elif _exchange(staged, folder):
        shutil.rmtree(staged)  # it holds the old folder now
    else:
        old = folder.parent / f".{folder.name}.old-{secrets.token_hex(4)}"
        os.rename(folder, old)
        os.rename(staged, folder)
        shutil.rmtree(old, ignore_errors=True)
    fsync_folder(folder.parent)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` atomically (Linux ``renameat2``); False where that is not available."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if os.name == "posix" else None
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EPERM, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a))
