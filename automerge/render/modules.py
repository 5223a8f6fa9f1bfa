"""The live modules bound to tensors someone else owns (the live merge engine's weights); built from
the configs an ``Architecture`` or a checkpoint header carries (``automerge.arch.live``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from automerge.arch.live import build_module, build_modules, live_name

__all__ = ["bind_modules", "build_module", "build_modules", "live_name"]


def bind_modules(
    configs: Mapping[str, Mapping[str, Any]],
    parameters: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    device: torch.device,
) -> dict[str, torch.nn.Module]:
    """Modules whose every parameter *is* the given tensor (``{component: {canonical name: tensor}}``,
    e.g. ``LiveEngine.live_parameters()``), so they see every in-place change of it.

    The modules are built on the meta device, so no placeholder weights are ever allocated; their
    buffers are then materialised on ``device``.
    """
    modules = build_modules(configs, meta=True)
    for component, named in parameters.items():
        module = modules[component]
        for name, tensor in named.items():
            path, _, attr = live_name(module, name).rpartition(".")
            owner = module.get_submodule(path) if path else module
            setattr(owner, attr, torch.nn.Parameter(tensor, requires_grad=False))
    for module in modules.values():
        _materialise_buffers(module, device)
        unbound = [name for name, param in module.named_parameters() if param.is_meta]
        if unbound:  # the key rules and the coverage tests make this a bug, not a user error
            raise RuntimeError(f"live parameters fed by no checkpoint key: {unbound[:5]}")
    return modules


def _materialise_buffers(module: torch.nn.Module, device: torch.device) -> None:
    """Real tensors for the meta buffers: CLIP's ``position_ids`` are 0..n−1; nothing else is expected."""
    for name, buffer in list(module.named_buffers()):
        if not buffer.is_meta:
            continue
        if not name.endswith("position_ids"):
            raise RuntimeError(f"no rule to materialise buffer '{name}' of shape {tuple(buffer.shape)}")
        path, _, attr = name.rpartition(".")
        owner = module.get_submodule(path) if path else module
        persistent = attr not in owner._non_persistent_buffers_set
        value = torch.arange(buffer.shape[-1], device=device).expand(buffer.shape).contiguous()
        owner.register_buffer(attr, value, persistent=persistent)
