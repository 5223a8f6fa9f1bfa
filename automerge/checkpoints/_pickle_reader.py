"""PyTorch pickle checkpoints (``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin``), read only through
``torch.load(weights_only=True)``: tensors, storages, dtypes and plain containers, never arbitrary globals.

A pickle can call any importable function while loading, so a file that ``weights_only`` refuses is never
loaded in full: the user converts it with a tool they trust (A1111 keeps its own allow-listing unpickler for
the same reason).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import torch

from automerge.checkpoints._base import (
    Checkpoint,
    TensorInfo,
    closed_error,
    require_file,
    unknown_key_error,
)
from automerge.errors import CheckpointError

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format since torch 1.6
PICKLE_PROTO = 0x80  # legacy torch.save: a protocol-2+ pickle stream
_GLOBAL = re.compile(r"GLOBAL (\S+?)(?: whose | was |\.?$)", re.MULTILINE)
_GENERIC_LINES = ("Weights only load failed", "Check the documentation", "(1)", "(2)", "Please file an issue")
_CONVERT_HINT = (
    "convert it to safetensors yourself with a tool you trust, only if you trust the file (e.g. "
    "`python -c \"import torch, safetensors.torch as s; sd = torch.load('in.ckpt', weights_only=False); "
    "s.save_file(sd.get('state_dict', sd), 'out.safetensors')\"`), or get the model's .safetensors release"
)


def pickle_kind(head: bytes) -> str | None:
    """``"zip"`` or ``"legacy"`` for the first bytes of a torch.save file, else None."""
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if len(head) >= 2 and head[0] == PICKLE_PROTO and 2 <= head[1] <= 5:
        return "legacy"
    return None


class PickleCheckpoint(Checkpoint):
    """The tensors of a weights-only-loaded state dict (memory-mapped for the zip format)."""

    def __init__(self, path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
        self.path = path
        self.metadata: Mapping[str, str] = MappingProxyType({})
        self._tensors: dict[str, torch.Tensor] | None = dict(tensors)
        self._keys = sorted(tensors)

    def keys(self) -> list[str]:
        return list(self._keys)

    def info(self, key: str) -> TensorInfo:
        tensor = self._tensor(key)
        return TensorInfo(shape=tuple(tensor.shape), dtype=tensor.dtype)

    def load(self, key: str) -> torch.Tensor:
        return self._tensor(key).detach()

    def close(self) -> None:
        self._tensors = None

    def _tensor(self, key: str) -> torch.Tensor:
        if self._tensors is None:
            raise closed_error(self.path)
        if key not in self._tensors:
            raise unknown_key_error(self.path, key, self._keys)
        return self._tensors[key]


def open_pickle_checkpoint(path: str | Path) -> PickleCheckpoint:
    """Load a PyTorch pickle checkpoint with ``weights_only=True``; keep only its tensors.

    A ``{"state_dict": {...}}`` wrapper (PyTorch Lightning / LDM) is unwrapped; other non-tensor values
    (``global_step``, optimizer state, ...) are ignored.
    """
    path = require_file(path)
    with path.open("rb") as f:
        kind = pickle_kind(f.read(4))
    if kind is None:
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a torch.save pickle); "
            "re-download it or check that it is the model file"
        )
    return PickleCheckpoint(path, _state_dict_tensors(path, _weights_only_load(path, mmap=kind == "zip")))


def _weights_only_load(path: Path, *, mmap: bool) -> object:
    """``torch.load`` restricted to weights; memory-mapped unless the legacy format forbids it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: {_refusal_reason(str(exc))}; {_CONVERT_HINT}"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(
            f"{path}: cannot read PyTorch checkpoint ({_first_sentence(exc)}); the file is corrupt "
            "or truncated, re-download it"
        ) from None


def _refusal_reason(message: str) -> str:
    """The global that torch's weights-only unpickler refused, else the most specific line it gave."""
    match = _GLOBAL.search(message)
    if match:
        return f"it needs the Python global `{match.group(1)}`, which weights-only loading does not run"
    for line in message.splitlines():
        line = line.split("WeightsUnpickler error:", 1)[-1].strip()
        if line and not line.startswith(_GENERIC_LINES):
            return f"weights-only loading refused it ({line})"
    return "weights-only loading refused it"


def _first_sentence(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.split(". ", 1)[0]


def _state_dict_tensors(path: Path, loaded: object) -> dict[str, torch.Tensor]:
    state = loaded.get("state_dict", loaded) if isinstance(loaded, Mapping) else loaded
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict of named tensors")
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors (keys: {sorted(map(str, state))[:5]})")
    return tensors
