"""Which checkpoint files hold the same bytes, found cheaply: the size, then the header bytes, and
only then (for files equal in both) the sha256 through the hash cache."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from pathlib import Path

from automerge.checkpoints._hashing import cached_sha256
from automerge.checkpoints._safetensors_header import MAX_HEADER_BYTES, PREFIX_BYTES

HEAD_BYTES = 1 << 20  # compared for files that are not safetensors (a pickle's first MiB)


def leading_bytes(path: Path) -> bytes:
    """A safetensors file's length prefix and JSON header (tensor names, dtypes, shapes, offsets and
    metadata), else the file's first ``HEAD_BYTES``."""
    with path.open("rb") as file:
        prefix = file.read(PREFIX_BYTES)
        if len(prefix) == PREFIX_BYTES:
            (length,) = struct.unpack("<Q", prefix)
            if 0 < length <= MAX_HEADER_BYTES:
                return prefix + file.read(length)
        return prefix + file.read(HEAD_BYTES - len(prefix))


def duplicate_files(paths: Mapping[str, Path]) -> dict[str, str]:
    """``{name: earlier name}`` for each file whose bytes equal those of a file earlier in ``paths``
    (folders are not compared). A file whose size or header bytes differ from every earlier one's
    is not hashed; the same path twice is the same file without hashing."""
    duplicates: dict[str, str] = {}
    seen: dict[tuple[int, bytes], list[tuple[str, Path]]] = {}
    for name, path in paths.items():
        if not path.is_file():
            continue
        candidates = seen.setdefault((path.stat().st_size, leading_bytes(path)), [])
        for earlier, earlier_path in candidates:
            if earlier_path.resolve() == path.resolve() or cached_sha256(earlier_path) == cached_sha256(path):
                duplicates[name] = earlier
                break
        else:
            candidates.append((name, path))
    return duplicates
