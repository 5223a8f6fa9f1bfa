"""The shapes of a real-size checkpoint's UNet and text-encoder weights, per family: what a LoRA for that
family must fit when no checkpoint is at hand. Taken from the family's live-module configs built on the
meta device (no memory, no weights), because the reference tables do not carry every family's widths
(SD2's table reuses SD1's UNet shapes and has OpenCLIP names only)."""

from __future__ import annotations

from collections.abc import Mapping

from automerge.arch import Architecture
from automerge.lora._names import name_index

_SHAPES: dict[str, tuple[Architecture, dict[str, tuple[int, ...]]]] = {}


def _build(arch: Architecture) -> dict[str, tuple[int, ...]]:
    from automerge.arch.live import build_modules, live_name  # diffusers and transformers: imported late

    index = name_index(arch)
    components = sorted({site.component for site in index.sites})
    modules = build_modules({name: arch.configs[name] for name in components}, meta=True)
    params = {name: dict(module.named_parameters()) for name, module in modules.items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for site in index.sites:
        shape = tuple(
            params[site.component][live_name(modules[site.component], site.module + ".weight")].shape
        )
        if site.chunk is not None:
            shape = (shape[0] * site.chunks, *shape[1:])
        elif site.transpose:
            shape = shape[::-1]
        shapes[site.key] = shape
    return shapes


def real_shapes(arch: Architecture) -> Mapping[str, tuple[int, ...]]:
    """Original key → shape in a real-size ``arch`` checkpoint (built once per family; the first call
    imports diffusers)."""
    cached = _SHAPES.get(arch.name)
    if cached is None or cached[0] is not arch:
        cached = (arch, _build(arch))
        _SHAPES[arch.name] = cached
    return cached[1]
