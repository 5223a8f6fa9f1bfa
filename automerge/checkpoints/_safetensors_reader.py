"""Lazy single-file safetensors reading: our own validated header for keys and infos, then
``safetensors.safe_open`` (memory-mapped) for one tensor at a time."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from automerge.checkpoints._base import (
    Checkpoint,
    TensorInfo,
    closed_error,
    require_file,
    unknown_key_error,
)
from automerge.checkpoints._safetensors_header import SafetensorsHeader, read_header
from automerge.errors import CheckpointError


class SafetensorsCheckpoint(Checkpoint):
    """A ``.safetensors`` file; the memory map opens at the first ``load`` and closes with ``close``."""

    def __init__(self, path: Path, header: SafetensorsHeader) -> None:
        self.path = path
        self.metadata: Mapping[str, str] = MappingProxyType(dict(header.metadata))
        self._infos = {name: entry.info for name, entry in header.tensors.items()}
        self._keys = sorted(self._infos)
        self._handle: Any = None
        self._closed = False

    def keys(self) -> list[str]:
        return list(self._keys)

    def info(self, key: str) -> TensorInfo:
        if key not in self._infos:
            raise unknown_key_error(self.path, key, self._keys)
        return self._infos[key]

    def load(self, key: str) -> torch.Tensor:
        expected = self.info(key)
        try:
            tensor: torch.Tensor = self._open_handle().get_tensor(key)
        except SafetensorError as exc:
            raise CheckpointError(f"{self.path}: cannot read tensor '{key}': {exc}") from None
        if tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise CheckpointError(f"{self.path}: tensor '{key}' changed on disk since the file was opened")
        return tensor

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._handle, self._closed = None, True

    def _open_handle(self) -> Any:
        if self._closed:
            raise closed_error(self.path)
        if self._handle is None:
            try:
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{self.path}: cannot open safetensors file: {exc}") from None
        return self._handle


def open_safetensors(path: str | Path) -> SafetensorsCheckpoint:
    """Open a single-file ``.safetensors`` checkpoint lazily; its header is validated, no data is read."""
    path = require_file(path)
    return SafetensorsCheckpoint(path, read_header(path))
