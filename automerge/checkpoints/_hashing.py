"""File hashes as the Stable Diffusion tools report them."""

from __future__ import annotations

import hashlib
import string
from pathlib import Path

from automerge.errors import CheckpointError

CHUNK_BYTES = 1 << 20  # 1 MiB
_SHORT_HASH_DIGITS = 10


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of the file's bytes, read in 1 MiB chunks."""
    path = Path(path)
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    try:
        with path.open("rb", buffering=0) as f:
            while n := f.readinto(buffer):
                digest.update(view[:n])
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise CheckpointError(f"cannot hash {path}: {exc.strerror}") from None
    return digest.hexdigest()


def a1111_short_hash(sha256_hex: str) -> str:
    """A1111's "AutoV2" short model hash: the first 10 hex digits of the file's sha256."""
    if len(sha256_hex) != 64 or any(c not in string.hexdigits for c in sha256_hex):
        raise ValueError(f"expected a 64-digit hex sha256, got {sha256_hex!r}")
    return sha256_hex[:_SHORT_HASH_DIGITS].lower()
