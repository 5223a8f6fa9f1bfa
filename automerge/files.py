"""Files automerge writes: output folders checked before any work, atomic writes, and paths written
relative to the file that names them.

An atomic write goes to a temporary file beside the target (``.<name>.tmp-XXXXXXXX``, created with mode
0o666 so the umask gives the final file the usual permissions), is flushed and fsynced, then renamed
onto the target: a reader never sees half a file, and a crash or an error leaves the old file as it was.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from automerge.errors import ConfigError


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


def relative_path(path: Path, folder: Path) -> str:
    """``path`` as a file in ``folder`` names it (POSIX separators), so that the folder and the files
    can move together; absolute where no relative path exists (another Windows drive)."""
    try:
        return Path(os.path.relpath(path.absolute(), folder.absolute())).as_posix()
    except ValueError:
        return str(path.absolute())


def create_temp_beside(path: Path) -> tuple[Path, BinaryIO]:
    """A new temporary file ``.<name>.tmp-XXXXXXXX`` in ``path``'s folder, open for binary writing
    (``O_EXCL``, mode 0o666 before the umask). Raises ``OSError`` when it cannot be created."""
    while True:
        temp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
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
