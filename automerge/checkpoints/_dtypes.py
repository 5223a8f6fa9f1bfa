"""The safetensors dtype strings and their torch equivalents (the file format's own names)."""

from __future__ import annotations

import torch

# Names as the safetensors reference implementation spells them, each with the torch dtype attribute.
# Some exist only in newer torch releases; those are looked up at import and simply absent if missing.
_TORCH_NAMES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "C64": "complex64",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
}

# Sub-byte dtypes of the format (packed several to a byte); automerge does not read or write them.
SUB_BYTE_DTYPES: frozenset[str] = frozenset({"F4", "F6_E2M3", "F6_E3M2"})

TORCH_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in _TORCH_NAMES.items() if hasattr(torch, attr)
}
SAFETENSORS_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def is_known_safetensors_dtype(name: str) -> bool:
    """Whether ``name`` is a dtype string of the safetensors format (supported here or not)."""
    return name in _TORCH_NAMES or name in SUB_BYTE_DTYPES
