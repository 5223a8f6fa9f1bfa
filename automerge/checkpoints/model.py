"""``open_model``: any supported checkpoint (single file or diffusers folder) as an original-layout
``Checkpoint`` with its family and the configs of its live modules."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from automerge.arch import Architecture, detect_architecture
from automerge.checkpoints._base import Checkpoint
from automerge.checkpoints._open import open_file_checkpoint
from automerge.checkpoints.diffusers_folder import DiffusersFolderCheckpoint, is_diffusers_folder
from automerge.errors import CheckpointError

CONFIGS_METADATA_KEY = "automerge.configs"
"""Header entry with the live-module configs (written by ``automerge tiny``; real files use the standard ones)."""


@dataclass
class SourceModel:
    """An opened model: lazy tensors in the original layout, family, live-module configs."""

    path: Path
    checkpoint: Checkpoint
    arch: Architecture
    layout: Literal["original", "diffusers"]
    configs: Mapping[str, Mapping[str, Any]]

    def close(self) -> None:
        self.checkpoint.close()

    def check_complete(self, name: str) -> None:
        """``CheckpointError`` when some parameter of the live modules has no tensor in the file (a
        truncated or stripped checkpoint): merged, it would make a file A1111 cannot load; rendered,
        a module with holes. ``name``: the model's letter, for the message."""
        from automerge.arch.parameters import unfed_parameters  # diffusers only when not cached

        missing = unfed_parameters(self.arch, self.configs, self.checkpoint.keys())
        if missing:
            count = sum(len(names) for names in missing.values())
            shown = "; ".join(f"{component}: {', '.join(names[:3])}" for component, names in missing.items())
            raise CheckpointError(
                f"model {name} ({self.path}) is incomplete: {count} {self.arch.name} parameters have no "
                f"tensor in it ({shown}); use a complete copy of the checkpoint"
            )

    def __enter__(self) -> SourceModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_model(path: str | Path) -> SourceModel:
    """Open a checkpoint file or diffusers folder and detect its family from keys and shapes."""
    path = Path(path).expanduser()
    if is_diffusers_folder(path):
        folder = DiffusersFolderCheckpoint(path)
        return SourceModel(path, folder, folder.arch, "diffusers", {**folder.arch.configs, **folder.configs})
    if path.is_dir():
        raise CheckpointError(
            f"{path}: is a directory but not a diffusers folder (no unet/ inside); give a .safetensors file"
        )
    checkpoint = open_file_checkpoint(path)
    try:
        keys = checkpoint.keys()
        arch = detect_architecture(set(keys), lambda key: checkpoint.info(key).shape, source=str(path))
        configs = _configs_from_header(checkpoint, path) or arch.configs
    except BaseException:
        checkpoint.close()
        raise
    return SourceModel(path, checkpoint, arch, "original", configs)


def _configs_from_header(checkpoint: Checkpoint, path: Path) -> dict[str, Any] | None:
    return header_json_object(checkpoint.metadata, CONFIGS_METADATA_KEY, path=path)


def header_json_object(metadata: Mapping[str, str], key: str, *, path: Path) -> dict[str, Any] | None:
    """The JSON object a safetensors header entry holds (None when the entry is absent or empty);
    ``CheckpointError`` naming the file and entry when it is not one."""
    text = metadata.get(key)
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: header entry '{key}' is not valid JSON") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: header entry '{key}' must be a JSON object")
    return data
