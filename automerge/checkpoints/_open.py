"""Opening a single checkpoint file: the reader is chosen by suffix, or by content for other suffixes."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from automerge.checkpoints._base import Checkpoint, require_file
from automerge.checkpoints._pickle_reader import open_pickle_checkpoint, pickle_kind
from automerge.checkpoints._safetensors_reader import open_safetensors
from automerge.errors import CheckpointError

_SNIFF_BYTES = 9


@dataclass(frozen=True)
class _FileFormat:
    """A single-file checkpoint format: its suffixes, a test on the first bytes, and its reader."""

    name: str
    suffixes: frozenset[str]
    sniff: Callable[[bytes], bool]
    open: Callable[[Path], Checkpoint]


def _looks_like_safetensors(head: bytes) -> bool:
    """An 8-byte little-endian header length followed by the JSON object's ``{``."""
    return len(head) >= 9 and struct.unpack("<Q", head[:8])[0] > 0 and head[8:9] == b"{"


def _looks_like_torch_pickle(head: bytes) -> bool:
    return pickle_kind(head) is not None


_FORMATS: tuple[_FileFormat, ...] = (
    _FileFormat("safetensors", frozenset({".safetensors"}), _looks_like_safetensors, open_safetensors),
    _FileFormat(
        "PyTorch pickle",
        frozenset({".ckpt", ".pt", ".pth", ".bin"}),
        _looks_like_torch_pickle,
        open_pickle_checkpoint,
    ),
)


def open_file_checkpoint(path: str | Path) -> Checkpoint:
    """Open a single-file checkpoint: known suffixes pick their reader, others are recognised by content."""
    path = require_file(path)
    suffix = path.suffix.lower()
    for fmt in _FORMATS:
        if suffix in fmt.suffixes:
            return fmt.open(path)
    with path.open("rb") as f:
        head = f.read(_SNIFF_BYTES)
    for fmt in _FORMATS:
        if fmt.sniff(head):
            return fmt.open(path)
    known = ", ".join(sorted(s for fmt in _FORMATS for s in fmt.suffixes))
    raise CheckpointError(
        f"{path}: unknown suffix '{suffix}' and content that is neither safetensors nor a PyTorch "
        f"checkpoint; expected one of {known}"
    )
