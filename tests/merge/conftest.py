"""Fixtures shared by the merge tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from automerge.checkpoints import open_model
from automerge.lora import extract_lora, write_kohya_lora


@pytest.fixture(scope="session")
def style_lora(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-4 LoRA of (d − c): a real difference LoRA of the tiny SD1 family."""
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    with open_model(tiny_models["c"]) as base, open_model(tiny_models["d"]) as tuned:
        extraction = extract_lora(base.checkpoint, tuned.checkpoint, base.arch, rank=4)
    write_kohya_lora(path, extraction.layers, base.arch)
    return path
