"""The live modules an architecture's configs describe (diffusers UNet / VAE, transformers CLIP text
encoders), built randomly initialised or on the meta device, and which of their parameters a
checkpoint's keys feed. Nothing is fetched from a hub."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

if TYPE_CHECKING:
    from automerge.arch._base import Architecture

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


@functools.lru_cache(maxsize=8)
def _parameter_names(configs_json: str) -> dict[str, tuple[frozenset[str], bool]]:
    """Per component: its parameters' names and whether its names drop ``text_model.``."""
    modules = build_modules(json.loads(configs_json), meta=True)
    return {
        component: (
            frozenset(name for name, _ in module.named_parameters()),
            live_name(module, "text_model.x") == "x",
        )
        for component, module in modules.items()
    }


def unfed_parameters(
    arch: Architecture, configs: Mapping[str, Mapping[str, Any]], keys: Iterable[str]
) -> dict[str, list[str]]:
    """Per component, the live parameters that none of ``keys`` (a checkpoint's, original layout)
    feeds: a checkpoint with any is incomplete for these configs (the modules are built on the meta
    device once per configs)."""
    names = _parameter_names(json.dumps(configs, sort_keys=True))
    fed: dict[str, set[str]] = {component: set() for component in names}
    for key in keys:
        for target in arch.targets(key):
            if target.component in fed:
                flat = names[target.component][1]
                fed[target.component].add(target.name.removeprefix("text_model.") if flat else target.name)
    missing = {component: sorted(params - fed[component]) for component, (params, _) in names.items()}
    return {component: names for component, names in missing.items() if names}
