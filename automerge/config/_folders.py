"""Folders and paths the user named: output folders created up front (or one line saying why not and
what to do), paths written relative to the file that names them."""

from __future__ import annotations

import os
from pathlib import Path

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
