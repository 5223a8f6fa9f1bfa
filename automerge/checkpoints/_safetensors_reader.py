"""Lazy single-file safetensors reading: our own validated header for keys, infos and byte ranges, then
one memory map of the file from which each tensor is a zero-copy view.

Why not ``safetensors.safe_open``: each of its handles holds its own parsed copy of the header (about
0.6 MB for an SDXL file), and a merge of 100 sources keeps 100 handles open, so memory grew with the
number of sources (issue 16); and each ``get_tensor`` costs ~20× a view. The map is private
(copy-on-write): pages are the file's page cache until something writes to one, which nothing does
(sources are never modified in place), so they are not anonymous memory.
"""

from __future__ import annotations

import functools
import mmap
import sys
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import torch

from automerge.checkpoints._base import (
    Checkpoint,
    TensorInfo,
    closed_error,
    require_file,
    unknown_key_error,
)
from automerge.checkpoints._paging import map_address, populate, request
from automerge.checkpoints._safetensors_header import PREFIX_BYTES, SafetensorsHeader, read_header
from automerge.errors import CheckpointError


class SafetensorsCheckpoint(Checkpoint):
    """A ``.safetensors`` file; the memory map opens at the first ``load`` and closes with ``close``."""

    def __init__(self, path: Path, header: SafetensorsHeader) -> None:
        self.path = path
        self.metadata: Mapping[str, str] = MappingProxyType(dict(header.metadata))
        # Key strings, infos and whole key tables shared between files: N sources of one family
        # written alike hold one table (~0.4 MB for an SDXL file), not N.
        layout = _shared_layout({
            sys.intern(name): (_shared_info(entry.info), entry.begin)
            for name, entry in header.tensors.items()
        })  # fmt: skip
        self._layout = layout  # keeps the shared table alive while this file is open
        self._entries, self._keys = layout.entries, layout.keys
        self._data_start = PREFIX_BYTES + header.length
        self._map: mmap.mmap | None = None
        self._map_lock = threading.Lock()
        self._closed = False

    def keys(self) -> list[str]:
        return list(self._keys)

    def info(self, key: str) -> TensorInfo:
        return self._entry(key)[0]

    def _entry(self, key: str) -> tuple[TensorInfo, int]:
        try:
            return self._entries[key]
        except KeyError:
            raise unknown_key_error(self.path, key, self._keys) from None

    def load(self, key: str) -> torch.Tensor:
        """A view of the mapped bytes (a copy only for a tensor whose offset is not aligned to its
        element size, which the format allows)."""
        info = self.info(key)
        begin = self._data_start + self._entries[key][1]
        count = info.numel
        if count == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        mapped = self._open_map()
        itemsize = info.dtype.itemsize
        if begin % itemsize:
            raw = bytearray(mapped[begin : begin + count * itemsize])
            return torch.frombuffer(raw, dtype=info.dtype, count=count).view(info.shape)
        return torch.frombuffer(mapped, dtype=info.dtype, count=count, offset=begin).view(info.shape)

    def load_run(self, keys: Sequence[str]) -> torch.Tensor | None:
        """One view of the map over ``keys`` when they are back to back in one dtype, aligned."""
        if not keys:
            return None
        run = self._derived("run", keys, self._run_of)
        if run is None:
            return None
        begin, end, dtype = run
        if (self._data_start + begin) % dtype.itemsize:
            return None
        count = (end - begin) // dtype.itemsize
        return torch.frombuffer(self._open_map(), dtype=dtype, count=count, offset=self._data_start + begin)

    def _run_of(self, keys: Sequence[str]) -> tuple[int, int, torch.dtype] | None:
        """The data section's bytes [begin, end) of ``keys`` back to back in one dtype, else None."""
        first, begin = self._entry(keys[0])
        end = begin + first.nbytes
        for key in keys[1:]:
            info, at = self._entry(key)
            if at != end or info.dtype != first.dtype:
                return None
            end += info.nbytes
        return None if end == begin else (begin, end, first.dtype)

    def request(self, keys: Sequence[str]) -> None:
        """``request`` the map's pages of ``keys``: their reads queued, exactly their bytes."""
        self._over_spans(keys, request)

    def read_ahead(self, keys: Sequence[str]) -> None:
        """``populate`` the map's pages of ``keys`` (adjacent keys in one call): read and mapped by the
        calling thread, so the merge's first touch of them neither waits for the disk nor faults."""
        self._over_spans(keys, populate)

    def _over_spans(self, keys: Sequence[str], advise: Callable[[int, int], None]) -> None:
        """``advise(address, length)`` of each span of ``keys``' bytes in the map (nothing once closed)."""
        if self._closed:
            return
        address = map_address(self._open_map()) + self._data_start
        for start, end in self._derived("spans", keys, self._spans_of):
            advise(address + start, end - start)

    def _spans_of(self, keys: Sequence[str]) -> list[tuple[int, int]]:
        """The data section's bytes of ``keys``, adjacent or overlapping ones joined: [(start, end)]."""
        spans: list[tuple[int, int]] = []
        for begin, nbytes in sorted((at, info.nbytes) for info, at in map(self._entry, keys)):
            if spans and begin <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(spans[-1][1], begin + nbytes))
            else:
                spans.append((begin, begin + nbytes))
        return spans

    def _derived(self, kind: str, keys: Sequence[str], compute: Callable[[Sequence[str]], _T]) -> _T:
        """``compute(keys)``, once per shared key table: the N sources of a merge ask alike, run after
        run (at 100 tiny sources, ~0.15 s of Python a merge; ``_Layout.derived``)."""
        derived, token = self._layout.derived, (kind, tuple(keys))
        try:
            return derived[token]
        except KeyError:
            pass
        value = compute(keys)
        if len(derived) >= _DERIVED_MAX:
            derived.clear()
        derived[token] = value
        return value

    def close(self) -> None:
        # Tensors still viewing the map keep it alive (the buffer protocol); it is unmapped when the
        # last one goes, so closing never invalidates a tensor already handed out.
        self._map, self._closed = None, True

    def _open_map(self) -> mmap.mmap:
        if self._closed:
            raise closed_error(self.path)
        mapped = self._map
        if mapped is None:
            with self._map_lock:  # the merge and a background reader (``read_ahead``) may open it at once
                mapped = self._map
                if mapped is None:
                    mapped = self._map = self._mapped()
        return mapped

    def _mapped(self) -> mmap.mmap:
        try:
            with self.path.open("rb") as file:
                return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: cannot map the file: {exc}") from None


_T = TypeVar("_T")
_DERIVED_MAX = 256  # runs and read-ahead windows remembered per key table (an SDXL export: ~60)


class _Layout:
    """A file's key table: name → (info, offset in the data section), the names sorted, and what was
    derived from it for lists of keys (their run, their spans; offsets within the data section)."""

    __slots__ = ("__weakref__", "derived", "entries", "keys")

    def __init__(self, entries: dict[str, tuple[TensorInfo, int]]) -> None:
        self.entries = entries
        self.keys = sorted(entries)
        self.derived: dict[tuple[str, tuple[str, ...]], Any] = {}


_LAYOUTS: weakref.WeakValueDictionary[int, _Layout] = weakref.WeakValueDictionary()
_layouts_lock = threading.Lock()


def _shared_layout(entries: dict[str, tuple[TensorInfo, int]]) -> _Layout:
    """The open files' table equal to ``entries`` when there is one, else a new one (kept while a
    file uses it)."""
    digest = hash(frozenset(entries.items()))
    with _layouts_lock:
        known = _LAYOUTS.get(digest)
        if known is not None and known.entries == entries:
            return known
        layout = _Layout(entries)
        if known is None:
            _LAYOUTS[digest] = layout
        return layout


@functools.lru_cache(maxsize=4096)
def _shared_info(info: TensorInfo) -> TensorInfo:
    """One ``TensorInfo`` object per distinct (shape, dtype)."""
    return info


def open_safetensors(path: str | Path) -> SafetensorsCheckpoint:
    """Open a single-file ``.safetensors`` checkpoint lazily; its header is validated, no data is read."""
    path = require_file(path)
    return SafetensorsCheckpoint(path, read_header(path))
