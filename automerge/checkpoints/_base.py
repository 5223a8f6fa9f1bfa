"""What every checkpoint reader offers: ``TensorInfo`` and the lazy, read-only ``Checkpoint`` protocol."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Self, runtime_checkable

import torch

from automerge.errors import CheckpointError
from automerge.registry import did_you_mean


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one stored tensor, known without reading its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    # Computed once, at construction: asked per key and source (``load_run``, the export's counts).
    # Not functools.cached_property: on Python < 3.12 it takes one lock shared by every instance,
    # and threads asking at once (the merge, the writer) queued on it (~50 µs a call).
    numel: int = field(init=False, repr=False, compare=False)
    """Number of elements: the product of ``shape`` (1 for a 0-dim tensor)."""
    nbytes: int = field(init=False, repr=False, compare=False)
    """Size of the data in bytes: ``numel × itemsize``."""

    def __post_init__(self) -> None:
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in self.shape):
            raise ValueError(f"TensorInfo shape must be non-negative ints, got {self.shape!r}")
        if not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"TensorInfo dtype must be a torch.dtype, got {self.dtype!r}")
        numel = math.prod(self.shape)
        object.__setattr__(self, "numel", numel)
        object.__setattr__(self, "nbytes", numel * self.dtype.itemsize)


@runtime_checkable
class Checkpoint(Protocol):
    """A lazy, read-only view of one checkpoint, keys in the file's own layout.

    Readers may subclass this protocol explicitly to inherit the context-manager methods.
    """

    path: Path
    metadata: Mapping[str, str]

    def keys(self) -> list[str]:
        """All tensor names, sorted."""
        ...

    def info(self, key: str) -> TensorInfo:
        """Shape and dtype of ``key``, read from the header only."""
        ...

    def load(self, key: str) -> torch.Tensor:
        """One tensor, on the CPU, in its stored dtype."""
        ...

    def load_run(self, keys: Sequence[str]) -> torch.Tensor | None:
        """The tensors ``keys`` as one flat view when they lie back to back in the file in one dtype
        (each one's bytes right after the previous one's), else None (then ``load`` each)."""
        return None

    def request(self, keys: Sequence[str]) -> None:
        """Ask the system to start reading the bytes of ``keys`` and return at once (``read_ahead``
        then waits for them); readers without a memory map do nothing."""
        return None

    def read_ahead(self, keys: Sequence[str]) -> None:
        """Bring the bytes of ``keys`` into memory before they are loaded, blocking only the calling
        thread (a background reader's); readers without a memory map do nothing."""
        return None

    def close(self) -> None:
        """Release file handles and memory maps; the checkpoint cannot be used afterwards."""
        ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def unknown_key_error(path: Path, key: str, keys: list[str]) -> CheckpointError:
    """The error for a tensor name that the checkpoint does not hold."""
    return CheckpointError(f"{path}: no tensor named '{key}'{did_you_mean(key, keys)}")


def closed_error(path: Path) -> ValueError:
    """The error for using a checkpoint after ``close()`` (a bug in the caller)."""
    return ValueError(f"checkpoint {path} is closed")


def _why_missing(path: Path) -> str:
    """Why ``path`` cannot be opened although its name may be there: a link loop, a dangling link."""
    import errno
    import os

    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "is a symbolic link loop (it points back to itself); link it to the model file"
        if path.is_symlink():
            return f"is a symbolic link to {os.readlink(path)}, which does not exist; fix or remove the link"
    return "does not exist; check the path"


def require_file(path: str | Path) -> Path:
    """``path`` as a Path if it is a non-empty regular file, else a one-line CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} {_why_missing(path)}")
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a directory; give a single .safetensors/.ckpt file "
            "(diffusers folders are read by the diffusers folder reader)"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); re-download or re-export it")
    return path
