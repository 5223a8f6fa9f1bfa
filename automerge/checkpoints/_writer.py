"""Streaming, atomic safetensors writing: the header is computed up front from the tensor infos, tensors are
written one at a time into a temporary file in the destination folder, which replaces the destination only
when every tensor has been written.

The kernel is asked to start writing back every ``WRITEBACK_BYTES`` as they are written, so that disk
writes overlap the merge and the final fsync does not find the whole file still dirty in the page
cache (measured: benchmarks/export_overlap.py). A background writer thread was measured too and gained
nothing on top, so writes stay on the caller's thread."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

import torch

from automerge.checkpoints._base import TensorInfo
from automerge.checkpoints._safetensors_header import encode_header
from automerge.errors import CheckpointError, ConfigError
from automerge.files import commit_temp, create_temp_beside

WRITEBACK_BYTES = 64 << 20  # start the kernel's writeback of each run of this many bytes


def _checked_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Safetensors metadata is strings only; anything else is refused, never converted."""
    checked = dict(metadata or {})
    for key, value in checked.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError(
                f"safetensors metadata must map strings to strings, got {key!r}: {value!r} "
                f"({type(value).__name__}); encode it as a string (e.g. json.dumps) first"
            )
    return checked


def _little_endian_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's data as contiguous little-endian bytes (a view where no copy is needed)."""
    flat = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
    raw = flat.view(torch.uint8)
    if sys.byteorder == "big" and flat.element_size() > 1:
        raw = raw.view(-1, flat.element_size()).flip(-1).reshape(-1)
    return raw.numpy().data


def _write_all(file: BinaryIO, data: memoryview) -> None:
    file.write(data)


def _start_writeback(file: BinaryIO, start: int, end: int) -> None:
    """Ask the kernel to begin writing ``[start, end)`` to disk without waiting for it (Linux starts
    writeback of dirty pages on ``POSIX_FADV_DONTNEED``; elsewhere this does nothing)."""
    if hasattr(os, "posix_fadvise"):
        file.flush()
        os.posix_fadvise(file.fileno(), start, end - start, os.POSIX_FADV_DONTNEED)


class SafetensorsWriter:
    """Context manager writing the tensors of ``infos`` (in that order) to ``path`` atomically.

    ``write(key, tensor)`` must be called for every key, in order, with the announced shape and dtype.
    On a clean exit the temporary file ``.<name>.tmp-XXXXXXXX`` is fsynced and renamed onto ``path``;
    on an exception, or if keys are missing, it is deleted and ``path`` is left as it was.
    """

    def __init__(
        self,
        path: str | Path,
        infos: Mapping[str, TensorInfo],
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self._infos = dict(infos)
        self._order = list(self._infos)
        self._header = encode_header(self._infos, metadata=_checked_metadata(metadata))
        self._written = 0
        self._entered = self._broken = False
        self._tmp: Path | None = None
        self._file: BinaryIO | None = None
        self._position = self._written_back = 0  # file offsets

    def __enter__(self) -> Self:
        if self._entered:
            raise ValueError(f"SafetensorsWriter for {self.path} can be entered only once")
        self._entered = True
        folder = self.path.parent
        if not folder.is_dir():
            raise ConfigError(f"cannot write {self.path}: folder {folder} does not exist; create it first")
        self._file = self._create_temp()
        try:
            with self._os_errors():
                self._file.write(self._header)
        except BaseException:
            self._discard()
            raise
        self._position = self._written_back = len(self._header)
        return self

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` as ``key``; it must be the next key, with the announced shape and dtype."""
        if self._file is None:
            raise ValueError(f"SafetensorsWriter for {self.path} is not open; use it in a `with` block")
        if self._written >= len(self._order):
            raise ValueError(f"{self.path}: '{key}' written after all {len(self._order)} tensors")
        expected_key = self._order[self._written]
        if key != expected_key:
            raise ValueError(f"{self.path}: expected tensor '{expected_key}' next, got '{key}'")
        expected, got = self._infos[key], TensorInfo(shape=tuple(tensor.shape), dtype=tensor.dtype)
        if got != expected:
            raise ValueError(f"{self.path}: tensor '{key}' is {got}, announced as {expected}")
        with self._os_errors():
            data = _little_endian_bytes(tensor)
            _write_all(self._file, data)
            self._position += data.nbytes
            if self._position - self._written_back >= WRITEBACK_BYTES:
                _start_writeback(self._file, self._written_back, self._position)
                self._written_back = self._position
        self._written += 1

    def update_metadata(self, metadata: Mapping[str, str]) -> None:
        """Replace the metadata before the file is committed (e.g. hashes computed while writing).

        The new header is written over the old one in place, padded with spaces to the same size, so
        it must not be longer: reserve room by passing placeholders of the final length up front.
        """
        if self._file is None:
            raise ValueError(f"SafetensorsWriter for {self.path} is not open; use it in a `with` block")
        header = encode_header(self._infos, metadata=_checked_metadata(metadata), size=len(self._header))
        with self._os_errors():
            position = self._file.tell()
            self._file.seek(0)
            self._file.write(header)
            self._file.seek(position)
        self._header = header

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            self._discard()

    def _create_temp(self) -> BinaryIO:
        """The temporary file beside the destination (mode 0o666 before the umask)."""
        try:
            self._tmp, file = create_temp_beside(self.path)
        except OSError as exc:
            raise CheckpointError(f"cannot write {self.path}: {exc.strerror}") from None
        return file

    def _commit(self) -> None:
        if self._broken:
            raise ValueError(f"{self.path}: a write failed earlier; nothing was saved")
        missing = self._order[self._written :]
        if missing:
            raise ValueError(
                f"{self.path}: {len(missing)} of {len(self._order)} tensors never written "
                f"(first: '{missing[0]}'); nothing was saved"
            )
        assert self._file is not None and self._tmp is not None
        with self._os_errors():
            file, self._file = self._file, None
            commit_temp(self._tmp, file, self.path)
            self._tmp = None

    def _discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    @contextmanager
    def _os_errors(self) -> Iterator[None]:
        """OS failures while writing (disk full, permissions) become a one-line CheckpointError."""
        try:
            yield
        except OSError as exc:
            self._broken = True
            raise CheckpointError(f"cannot write {self.path}: {exc.strerror or exc}") from None


def save_safetensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` (in mapping order) to ``path`` atomically through ``SafetensorsWriter``."""
    infos = {key: TensorInfo(shape=tuple(t.shape), dtype=t.dtype) for key, t in tensors.items()}
    with SafetensorsWriter(path, infos, metadata=metadata) as writer:
        for key, tensor in tensors.items():
            writer.write(key, tensor)
