"""A diffusers folder (``unet/``, ``text_encoder/``, ``text_encoder_2/``, ``vae/``) read as if it were an
original-layout checkpoint: the same key rules that feed the live modules are run backwards, so every
later stage sees one layout. Fused OpenCLIP q/k/v are concatenated back, 1×1 conv attention weights
regain their trailing dimensions, ``text_projection`` is transposed back."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from automerge.arch import ARCHITECTURES, Target, View, detect_folder_architecture, reference_keys
from automerge.checkpoints._base import Checkpoint, TensorInfo, unknown_key_error
from automerge.checkpoints._open import open_file_checkpoint
from automerge.errors import CheckpointError

_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)
_TEXT_MODEL_OPTIONS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "projection_dim",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "unet").is_dir()


def _weights_file(folder: Path) -> Path:
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(
        f"{folder}: no weights file ({', '.join(_WEIGHT_NAMES[:2])}, ...) in this diffusers component"
    )


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: missing or invalid config.json ({error})") from None


def _component_dirs() -> list[str]:
    """The sub-folders a diffusers folder may have: every component of every family, in family order."""
    names = [component.name for _, arch in ARCHITECTURES.items() for component in arch.components]
    return list(dict.fromkeys(names))


def _live_config(config: Mapping[str, Any], family_config: Mapping[str, Any]) -> dict[str, Any]:
    """A component's config.json as the live-module config (``_class`` + constructor options): a
    diffusers config keeps every option, a transformers one (it names its ``model_type``) only the
    text-model options; the class is the family's unless the file names its own."""
    if "model_type" not in config:
        options = {k: v for k, v in config.items() if not k.startswith("_")}
        return {"_class": family_config["_class"], **options}
    architectures = config.get("architectures") or [family_config["_class"]]
    return {"_class": architectures[0], **{k: config[k] for k in _TEXT_MODEL_OPTIONS if k in config}}


@dataclass(frozen=True)
class _Source:
    targets: tuple[Target, ...]


class DiffusersFolderCheckpoint(Checkpoint):
    """Original-layout view of a diffusers folder; tensors are assembled on ``load``."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root)
        self.metadata: Mapping[str, str] = {}
        folder_configs = {
            d: _read_config(self.path / d) for d in _component_dirs() if (self.path / d).is_dir()
        }
        self.arch = detect_folder_architecture(folder_configs, source=str(self.path))
        self.configs = {
            name: _live_config(config, self.arch.configs[name]) for name, config in folder_configs.items()
        }
        self._files = {name: open_file_checkpoint(_weights_file(self.path / name)) for name in folder_configs}
        self._sources: dict[str, _Source] = {}
        for ref in reference_keys(self.arch.name):
            targets = self.arch.targets(ref.key)
            if targets and all(self._has(t) for t in targets):
                self._sources[ref.key] = _Source(targets)

    def _has(self, target: Target) -> bool:
        file = self._files.get(target.component)
        return file is not None and self._stored_name(target) in file.keys()

    def _stored_name(self, target: Target) -> str:
        # transformers ≥ 5.6 saves CLIPTextModel without its `text_model.` level
        file = self._files[target.component]
        if target.name in file.keys() or not target.name.startswith("text_model."):
            return target.name
        return target.name.removeprefix("text_model.")

    def keys(self) -> list[str]:
        return sorted(self._sources)

    def info(self, key: str) -> TensorInfo:
        source = self._get(key)
        infos = [self._files[t.component].info(self._stored_name(t)) for t in source.targets]
        first, shape = source.targets[0], infos[0].shape
        if first.view is View.ROWS:
            shape = (sum(i.shape[0] for i in infos), *shape[1:])
        elif first.view is View.SQUEEZE:
            shape = (*shape, 1, 1)
        elif first.view is View.TRANSPOSE:
            shape = tuple(reversed(shape))
        return TensorInfo(tuple(shape), infos[0].dtype)

    def load(self, key: str) -> torch.Tensor:
        source = self._get(key)
        parts = [self._files[t.component].load(self._stored_name(t)) for t in source.targets]
        view = source.targets[0].view
        if view is View.ROWS:
            return torch.cat(parts, dim=0)
        if view is View.SQUEEZE:
            return parts[0][:, :, None, None]
        if view is View.TRANSPOSE:
            return parts[0].t().contiguous()
        return parts[0]

    def _get(self, key: str) -> _Source:
        try:
            return self._sources[key]
        except KeyError:
            raise unknown_key_error(self.path, key, self.keys()) from None

    def close(self) -> None:
        for file in self._files.values():
            file.close()
