"""The safetensors header: reading and validating it without touching tensor data, and encoding it.

File layout (safetensors reference implementation): ``u64`` little-endian header length ``n``, ``n`` bytes of
JSON (``{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}}``, padded
with spaces to a multiple of 8), then the data section; offsets are relative to the data section, and the
tensors must tile it exactly (no gap, no overlap, no trailing bytes).
"""

from __future__ import annotations

import json
import struct
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from automerge.checkpoints._base import TensorInfo
from automerge.checkpoints._dtypes import (
    SAFETENSORS_NAMES,
    SUB_BYTE_DTYPES,
    TORCH_DTYPES,
    is_known_safetensors_dtype,
)
from automerge.errors import CheckpointError

PREFIX_BYTES = 8
MAX_HEADER_BYTES = 100_000_000  # the reference implementation refuses larger headers
METADATA_KEY = "__metadata__"
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the header: its info and its byte range ``[begin, end)`` in the data section."""

    info: TensorInfo
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: string metadata, the tensors by name, and its own length in bytes (the data
    section starts at 8 + ``length``)."""

    metadata: Mapping[str, str]
    tensors: Mapping[str, TensorEntry]
    length: int


class _HeaderProblem(Exception):
    """Internal: what is wrong with a header, turned into a CheckpointError naming the file."""

    fix = "the file is corrupt or not safetensors, re-download or re-export it"


class _UnsupportedDtype(_HeaderProblem):
    fix = "convert the file to F16, BF16 or F32 (or upgrade torch) first"


def read_header(path: Path) -> SafetensorsHeader:
    """Read and validate the header of ``path``; reads ``8 + n`` bytes and nothing of the data section."""
    try:
        return _read_header(path)
    except _HeaderProblem as problem:
        raise CheckpointError(f"{path}: not a readable safetensors file: {problem}; {problem.fix}") from None


def _read_header(path: Path) -> SafetensorsHeader:
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(PREFIX_BYTES)
        if len(prefix) < PREFIX_BYTES:
            raise _HeaderProblem(f"file is {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", prefix)
        if n > size - PREFIX_BYTES:
            raise _HeaderProblem(
                f"header length {n} bytes exceeds the {size - PREFIX_BYTES} bytes that follow it (truncated)"
            )
        if n > MAX_HEADER_BYTES:
            raise _HeaderProblem(f"header length {n} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
        raw = f.read(n)
    return parse_header(raw, data_bytes=size - PREFIX_BYTES - n)


def parse_header(raw: bytes, *, data_bytes: int) -> SafetensorsHeader:
    """Validate the JSON header ``raw`` against a data section of ``data_bytes`` bytes."""
    document = _parse_json(raw)
    metadata = _parse_metadata(document.pop(METADATA_KEY, None))
    return SafetensorsHeader(metadata=metadata, tensors=_tensor_table(document, data_bytes), length=len(raw))


_TABLES: OrderedDict[tuple[int, int, str | None], tuple[dict[str, Any], Mapping[str, TensorEntry]]] = (
    OrderedDict()
)
_TABLES_KEPT = 8
_tables_lock = threading.Lock()


def _tensor_table(document: dict[str, Any], data_bytes: int) -> Mapping[str, TensorEntry]:
    """The tensors of a header's JSON (its metadata removed), validated. Sources written alike (the
    fine-tunes of one base: 2,518 entries each for SDXL) have equal tables: a table equal to one of
    the last few validated (compared in full) is that one's, not validated again (~30 ms a file)."""
    fingerprint = (data_bytes, len(document), next(iter(document), None))
    with _tables_lock:
        known = _TABLES.get(fingerprint)
    if known is not None and known[0] == document:
        return known[1]
    tensors = MappingProxyType({name: _parse_entry(name, entry) for name, entry in document.items()})
    _check_tiling(tensors, data_bytes=data_bytes)
    with _tables_lock:
        _TABLES[fingerprint] = (document, tensors)
        _TABLES.move_to_end(fingerprint)
        while len(_TABLES) > _TABLES_KEPT:
            _TABLES.popitem(last=False)
    return tensors


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen = dict(pairs)
    if len(seen) != len(pairs):
        names = [key for key, _ in pairs]
        twice = next(key for i, key in enumerate(names) if key in names[:i])
        raise _HeaderProblem(f"header names '{twice}' twice")
    return seen


def _parse_json(raw: bytes) -> dict[str, Any]:
    try:
        document = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _HeaderProblem(f"header is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise _HeaderProblem(f"header is a JSON {type(document).__name__}, not an object")
    return document


def _parse_metadata(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _HeaderProblem(f"'{METADATA_KEY}' is a {type(value).__name__}, not an object of strings")
    for key, item in value.items():
        if not isinstance(item, str):
            raise _HeaderProblem(f"'{METADATA_KEY}' value for '{key}' is {item!r}, not a string")
    return value


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_entry(name: str, entry: object) -> TensorEntry:
    if not isinstance(entry, dict) or any(field not in entry for field in _ENTRY_FIELDS):
        raise _HeaderProblem(f"tensor '{name}' entry {entry!r} lacks one of {list(_ENTRY_FIELDS)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise _HeaderProblem(f"tensor '{name}' has shape {shape!r}, not a list of non-negative ints")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise _HeaderProblem(f"tensor '{name}' has data_offsets {offsets!r}, not [begin, end]")
    begin, end = offsets
    if end < begin:
        raise _HeaderProblem(f"tensor '{name}' has data_offsets {offsets!r} with end before begin")
    info = TensorInfo(shape=tuple(shape), dtype=_torch_dtype(name, dtype))
    if end - begin != info.nbytes:
        raise _HeaderProblem(
            f"tensor '{name}' spans {end - begin} bytes but shape {shape} of {dtype} needs {info.nbytes}"
        )
    return TensorEntry(info=info, begin=begin, end=end)


def _torch_dtype(name: str, dtype: object) -> torch.dtype:
    if not isinstance(dtype, str) or not is_known_safetensors_dtype(dtype):
        raise _HeaderProblem(f"tensor '{name}' has unknown dtype {dtype!r}")
    if dtype in SUB_BYTE_DTYPES:
        raise _UnsupportedDtype(f"tensor '{name}' has sub-byte dtype {dtype}, which automerge does not read")
    if dtype not in TORCH_DTYPES:
        raise _UnsupportedDtype(f"tensor '{name}' has dtype {dtype}, which torch {torch.__version__} lacks")
    return TORCH_DTYPES[dtype]


def _check_tiling(tensors: Mapping[str, TensorEntry], *, data_bytes: int) -> None:
    """Tensors sorted by offset must cover ``[0, data_bytes)`` exactly, as the reference requires."""
    position, previous = 0, None
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin < position:
            raise _HeaderProblem(
                f"tensor '{name}' at bytes [{entry.begin}, {entry.end}) overlaps tensor '{previous}'"
            )
        if entry.begin > position:
            raise _HeaderProblem(f"gap of {entry.begin - position} bytes before tensor '{name}'")
        position, previous = entry.end, name
    if position > data_bytes:
        raise _HeaderProblem(
            f"data section is {data_bytes} bytes but tensor '{previous}' ends at byte {position} (truncated)"
        )
    if position < data_bytes:
        raise _HeaderProblem(f"{data_bytes - position} unexpected bytes after the last tensor")


def encode_header(
    infos: Mapping[str, TensorInfo], *, metadata: Mapping[str, str], size: int | None = None
) -> bytes:
    """Length prefix and JSON header for tensors stored back to back in ``infos`` order.

    The JSON is compact, ``__metadata__`` first (omitted when empty), padded with spaces so that the
    data section starts at a multiple of 8 bytes, as the reference implementation writes it. With
    ``size``, it is padded to exactly ``size`` bytes instead (to rewrite the header of a written
    file in place); a header that does not fit raises ``ValueError``.
    """
    document: dict[str, object] = {METADATA_KEY: dict(metadata)} if metadata else {}
    offset = 0
    for name, info in infos.items():
        if name == METADATA_KEY:
            raise ValueError(f"'{METADATA_KEY}' cannot be a tensor name")
        if info.dtype not in SAFETENSORS_NAMES:
            raise ValueError(f"tensor '{name}' has dtype {info.dtype}, which safetensors cannot store")
        document[name] = {
            "dtype": SAFETENSORS_NAMES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    body = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if size is None:
        body += b" " * (-len(body) % PREFIX_BYTES)
    elif len(body) + PREFIX_BYTES <= size:
        body += b" " * (size - PREFIX_BYTES - len(body))
    else:
        raise ValueError(f"the header takes {len(body) + PREFIX_BYTES} bytes, more than the {size} reserved")
    return struct.pack("<Q", len(body)) + body
