"""The live modules an architecture's configs describe (diffusers UNet / VAE, transformers CLIP text
encoders), built randomly initialised or on the meta device. Nothing is fetched from a hub. Which of
their parameters a checkpoint's keys feed: ``automerge.arch.parameters``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

_CLASSES: dict[str, Any] = {
    "UNet2DConditionModel": UNet2DConditionModel,
    "AutoencoderKL": AutoencoderKL,
    "CLIPTextModel": CLIPTextModel,
    "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
}


def build_module(config: Mapping[str, Any], *, meta: bool = False) -> torch.nn.Module:
    """One module from ``config`` (``_class`` + constructor config), randomly initialised by its
    library's default init (use ``torch.manual_seed`` around it), or on the meta device."""
    options = {k: v for k, v in config.items() if k != "_class"}
    cls = _CLASSES[config["_class"]]
    with torch.device("meta") if meta else torch.device("cpu"):
        if cls in (CLIPTextModel, CLIPTextModelWithProjection):
            module = cls(CLIPTextConfig(**options))
        else:
            module = cls(**options)
    return module.eval().requires_grad_(False)


def build_modules(
    configs: Mapping[str, Mapping[str, Any]], *, meta: bool = False
) -> dict[str, torch.nn.Module]:
    return {name: build_module(config, meta=meta) for name, config in configs.items()}


def live_name(module: torch.nn.Module, canonical: str) -> str:
    """The module's own name for a canonical (converter-style) parameter name: transformers ≥ 5.6
    flattened CLIPTextModel (no ``text_model.`` level); CLIPTextModelWithProjection keeps it."""
    if isinstance(module, CLIPTextModel) and not hasattr(module, "text_model"):
        return canonical.removeprefix("text_model.")
    return canonical
