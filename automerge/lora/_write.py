"""``write_kohya_lora``: layers as a kohya-format LoRA (``<name>.lora_down.weight``, ``.lora_up.weight``,
``.alpha``), named as kohya's sd-scripts names them for the family, with its ``ss_*`` metadata and the
modelspec header; written atomically."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from automerge.arch import Architecture
from automerge.checkpoints import save_safetensors
from automerge.errors import ConfigError
from automerge.lora._layer import LoraLayer
from automerge.lora._names import NameIndex, name_index


def _chunk(layer: LoraLayer) -> int | None:
    """Which row block of its original tensor the layer adapts (None: all of it)."""
    if layer.rows is None:
        return None
    start, end = layer.rows
    size = end - start
    return start // size if size > 0 and start % size == 0 else -1


def _kohya_name(layer: LoraLayer, index: NameIndex, arch: Architecture) -> str:
    site = index.site(layer.key, _chunk(layer))
    if site is None or site.kohya is None:
        raise ConfigError(
            f"cannot write a LoRA layer for '{layer.key}' (rows {layer.rows}): kohya LoRAs of {arch.title} "
            "adapt attention, MLP, projection and resnet/sampler conv weights only"
        )
    return index.kohya_names[(site.key, site.chunk)]


def _kohya_shapes(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """up and down as kohya's modules hold them: a conv's down [r, in, kh, kw], its up [out, r, 1, 1]."""
    if layer.kernel is None:
        return layer.up, layer.down
    return layer.up.reshape(*layer.up.shape, 1, 1), layer.down.reshape(layer.rank, -1, *layer.kernel)


def _defaults(layers: list[LoraLayer], arch: Architecture, path: Path) -> dict[str, str]:
    """kohya's minimum ``ss_*`` metadata (as networks/extract_lora_from_models.py writes it) + modelspec."""
    dim = max(layer.rank for layer in layers)
    alphas = {layer.scale * layer.rank for layer in layers if layer.rank == dim}
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_base_model_version": arch.kohya.base_model_version,
        "ss_v2": str(arch.kohya.base_model_version.startswith("sd_v2")),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch.modelspec_architecture}/lora",
        "modelspec.title": path.stem,
    }
    if len(alphas) == 1:
        metadata["ss_network_alpha"] = str(float(alphas.pop()))
    convs = [layer for layer in layers if layer.kernel is not None and layer.kernel != (1, 1)]
    if convs:
        conv_dim = max(layer.rank for layer in convs)
        conv_alpha = max(layer.scale * layer.rank for layer in convs if layer.rank == conv_dim)
        metadata["ss_network_args"] = json.dumps(
            {"conv_dim": str(conv_dim), "conv_alpha": str(float(conv_alpha))}
        )
    return metadata


def write_kohya_lora(
    path: Path, layers: Iterable[LoraLayer], arch: Architecture, *, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``layers`` to ``path`` as a kohya LoRA for ``arch``, atomically: in their dtype, a conv layer
    (``kernel`` set) in kohya's LoCon shapes (down [r, in, kh, kw], up [out, r, 1, 1]), alpha = scale ·
    rank in float32. ``metadata`` adds to (and overrides) the defaults."""
    path = Path(path)
    index = name_index(arch)
    listed = list(layers)
    if not listed:
        raise ConfigError(f"{path}: no LoRA layers to write")
    tensors: dict[str, torch.Tensor] = {}
    for layer in listed:
        name = _kohya_name(layer, index, arch)
        if f"{name}.alpha" in tensors:
            raise ConfigError(f"{path}: two layers for '{layer.key}' (kohya name {name})")
        up, down = _kohya_shapes(layer)
        tensors[f"{name}.alpha"] = torch.tensor(layer.scale * layer.rank, dtype=torch.float32)
        tensors[f"{name}.lora_down.weight"] = down.detach().cpu().contiguous()
        tensors[f"{name}.lora_up.weight"] = up.detach().cpu().contiguous()
    header = {**_defaults(listed, arch, path), **(metadata or {})}
    save_safetensors(path, dict(sorted(tensors.items())), metadata=header)
