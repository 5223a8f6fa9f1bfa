"""Dtype names as users write them in recipes, study files, manifests and on the command line
(``fp16``, ``bf16``, ``fp32``, ``fp64``), and their torch dtypes: the one table."""

from __future__ import annotations

from typing import Literal

import torch

from automerge.errors import ConfigError

DtypeName = Literal["fp16", "bf16", "fp32"]
"""Storage and live-weight dtypes."""

ComputeDtypeName = Literal["fp32", "fp64"]
"""Dtypes merge math runs in."""

TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "fp64": torch.float64,
}
STORAGE_NAMES: tuple[str, ...] = ("fp16", "bf16", "fp32")


def torch_dtype(name: str, *, allowed: tuple[str, ...] = STORAGE_NAMES, where: str = "dtype") -> torch.dtype:
    """The torch dtype of ``name`` (one of ``allowed``); a ``ConfigError`` naming ``where`` (e.g.
    "--dtype") otherwise."""
    if name not in allowed:
        raise ConfigError(f"{where} must be one of {', '.join(allowed)}, got '{name}'")
    return TORCH_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``fp16`` for ``torch.float16`` and so on (the inverse of ``torch_dtype``)."""
    for name, value in TORCH_DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"no automerge name for {dtype}")
