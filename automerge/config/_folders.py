"""Output folders that the user named: created up front, or one line saying why not and what to do."""

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
