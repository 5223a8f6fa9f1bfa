"""``RenderConfig``: where and how a merge is rendered — device, dtype, batch size, tokenizers, compile,
low-VRAM offload, source storage. The ``render:`` section of a study file, and the options of
``automerge render``; each setting has its one default and its one check here."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from automerge.config import FileRef, Schema
from automerge.dtypes import TORCH_DTYPES
from automerge.errors import ConfigError

MAX_BATCH_SIZE = 64


class RenderConfig(Schema):
    """How a ``RenderSession`` keeps and renders a merge."""

    device: str = Field("auto", description="auto (a CUDA GPU if there is one), cpu, cuda, cuda:1, ...")
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = Field(
        "auto", description="of the live weights: auto = fp16 on a GPU, fp32 on the CPU"
    )
    batch_size: int = Field(4, ge=1, le=MAX_BATCH_SIZE, description="images per pipeline call")
    tokenizer_dir: FileRef | None = Field(
        None, description="a diffusers model folder with tokenizer/ (and tokenizer_2/); unset: vendored BPE"
    )
    compile: bool = Field(False, description="torch.compile the UNet")
    offload: bool = Field(
        False, description="sources in pinned host memory, streamed per block (24 GB cards)"
    )
    source_dtype: Literal["same", "fp16", "bf16"] = Field(
        "same", description="storage of the resident sources (same: the live dtype)"
    )

    @field_validator("device")
    @classmethod
    def _a_device(cls, device: str) -> str:
        if device == "auto":
            return device
        try:
            kind = torch.device(device).type
        except (RuntimeError, ValueError):
            kind = None
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"'{device}' is not a device; use auto, cpu, cuda or cuda:N")
        return device

    def torch_device(self, *, where: str = "render.device") -> torch.device:
        """The device: ``auto`` is CUDA when a GPU is visible, else the CPU. ``where``: the setting's
        name in the error when the device is not there (a study file's field, a command's option)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"{where} is '{self.device}' but no CUDA GPU is available; use 'cpu' or 'auto'")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(
                f"{where} is '{self.device}' but this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                "use cuda:0 to cuda:N-1"
            )
        return device

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        """The live weights' dtype: ``auto`` is fp16 on a GPU (bf16 is the user's choice), fp32 on the CPU."""
        if self.dtype == "auto":
            return torch.float16 if device.type == "cuda" else torch.float32
        return TORCH_DTYPES[self.dtype]

    def storage_dtype(self, device: torch.device) -> torch.dtype:
        """The resident sources' dtype (``same``: the live weights')."""
        return self.torch_dtype(device) if self.source_dtype == "same" else TORCH_DTYPES[self.source_dtype]
