"""``read_lora``: a LoRA file (safetensors only: a pickle is never unpickled) in kohya/A1111, diffusers or
PEFT key format as ``LoraLayer``s on the original-layout keys of one family. Every name and shape is
checked from the header before a tensor is read; a file that does not fit is a one-line ``ConfigError``
naming the file, the first layer that does not fit and the fix.

Scaling follows the tools that apply these files: kohya's ``alpha`` key gives scale = alpha / rank
(ComfyUI ``comfy/lora.py``, A1111); PEFT files may carry their config in the header (diffusers'
``lora_adapter_metadata``: ``lora_alpha``, ``alpha_pattern``, ``use_rslora``); otherwise scale = 1, as
ComfyUI and diffusers read a file without alphas. A LoCon ``lora_mid`` (CP/Tucker conv) is folded into
``down`` as ComfyUI does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from automerge.arch import ARCHITECTURES, Architecture
from automerge.checkpoints import Checkpoint, header_json_object, open_safetensors
from automerge.errors import ConfigError
from automerge.lora._layer import Lora, LoraLayer
from automerge.lora._names import Site, name_index
from automerge.lora._shapes import real_shapes
from automerge.registry import did_you_mean

# Tensor-name endings → (key format, part). kohya/A1111 and LyCORIS LoCon; diffusers' LoRA-compatible
# layers, attention processors and text-encoder patches; PEFT. An alpha may come with any format.
_PARTS: tuple[tuple[str, str | None, str], ...] = (
    (".lora_up.weight", "kohya", "up"),
    (".lora_down.weight", "kohya", "down"),
    (".lora_mid.weight", "kohya", "mid"),
    (".lora.up.weight", "diffusers", "up"),
    (".lora.down.weight", "diffusers", "down"),
    ("_lora.up.weight", "diffusers", "up"),
    ("_lora.down.weight", "diffusers", "down"),
    (".lora_linear_layer.up.weight", "diffusers", "up"),
    (".lora_linear_layer.down.weight", "diffusers", "down"),
    (".lora_B.weight", "peft", "up"),
    (".lora_A.weight", "peft", "down"),
    (".alpha", None, "alpha"),
)
# Other adapter types (LyCORIS, PEFT) by a tensor-name marker (ComfyUI comfy/lora.py names them so).
_UNSUPPORTED: tuple[tuple[str, str], ...] = (
    (r"\.hada_\w+$", "LoHa"),
    (r"\.lokr_\w+$", "LoKr"),
    (r"\.dora_scale$|\.lora_magnitude_vector\b", "DoRA"),
    (r"\.b?oft_\w+$", "OFT"),
    (r"\.[ab][12]\.weight$", "GLoRA"),
    (r"\.diff(_b)?$|\.[wb]_norm$", "full weight-difference"),
)
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


@dataclass
class _Module:
    """The tensors a LoRA file holds for one module name."""

    name: str
    parts: dict[str, str] = field(default_factory=dict)  # "up" | "down" | "mid" | "alpha" → tensor name
    formats: set[str] = field(default_factory=set)


def _split(key: str) -> tuple[str, str | None, str] | None:
    for suffix, fmt, part in _PARTS:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], fmt, part
    return None


def _unknown_key_error(path: Path, key: str) -> ConfigError:
    for pattern, kind in _UNSUPPORTED:
        if re.search(pattern, key):
            return ConfigError(
                f"{path}: '{key}' is a {kind} layer, which automerge does not support yet (it reads LoRA "
                "and LoCon: lora_up/lora_down); bake it into the checkpoint with another tool, or use a LoRA"
            )
    return ConfigError(
        f"{path}: '{key}' is not a LoRA tensor name automerge reads (kohya …lora_up.weight/…lora_down.weight/"
        "….alpha, diffusers ….lora.up.weight, PEFT ….lora_A.weight/….lora_B.weight); convert the file to "
        "kohya format"
    )


def _group(path: Path, keys: list[str]) -> dict[str, _Module]:
    """The file's tensors by module name, each with an up and a down."""
    modules: dict[str, _Module] = {}
    for key in keys:
        split = _split(key)
        if split is None:
            raise _unknown_key_error(path, key)
        name, fmt, part = split
        module = modules.setdefault(name, _Module(name))
        if part in module.parts:
            raise ConfigError(f"{path}: '{module.parts[part]}' and '{key}' are both the {part} of '{name}'")
        module.parts[part] = key
        if fmt is not None:
            module.formats.add(fmt)
    for module in modules.values():
        missing = [part for part in ("up", "down") if part not in module.parts]
        if missing:
            raise ConfigError(
                f"{path}: '{module.name}' has no {' and no '.join(missing)} tensor (has "
                f"{', '.join(sorted(module.parts.values()))}); the file is incomplete or not a LoRA"
            )
    if not modules:
        raise ConfigError(f"{path}: holds no LoRA tensors")
    return modules


def _format(path: Path, modules: Mapping[str, _Module]) -> str:
    formats = sorted({fmt for module in modules.values() for fmt in module.formats})
    if len(formats) > 1:
        first = {fmt: next(m.name for m in modules.values() if fmt in m.formats) for fmt in formats}
        shown = ", ".join(f"{fmt} ('{name}')" for fmt, name in first.items())
        raise ConfigError(f"{path}: mixes LoRA key formats {shown}; convert it to one format")
    return formats[0]


@dataclass(frozen=True)
class _Geometry:
    out: int  # rows of the product up @ down
    features: int  # its columns: in · kh · kw
    kernel: tuple[int, ...]  # down's (in, kh, kw) for a conv, (in,) for a linear layer


def _geometry(module: _Module, infos: Mapping[str, tuple[int, ...]]) -> _Geometry | str:
    """The product's size from the header shapes, or what is wrong with them."""
    up, down = infos[module.parts["up"]], infos[module.parts["down"]]
    if len(up) not in (2, 4) or (len(up) == 4 and up[2:] != (1, 1)):
        return f"'{module.name}': lora up is {list(up)}, not [out, rank] or [out, rank, 1, 1]"
    if len(down) not in (2, 4):
        return f"'{module.name}': lora down is {list(down)}, not [rank, in] or [rank, in, kh, kw]"
    kernel, rank = tuple(down[1:]), down[0]
    if "mid" in module.parts:
        mid = infos[module.parts["mid"]]
        if len(mid) != 4 or len(down) != 4 or down[2:] != (1, 1) or mid[1] != down[0]:
            return f"'{module.name}': lora mid {list(mid)} does not follow lora down {list(down)}"
        kernel, rank = (down[1], *mid[2:]), mid[0]
    if up[1] != rank:
        return f"'{module.name}': lora up {list(up)} and lora down {list(down)} have different ranks"
    return _Geometry(up[0], math.prod(kernel), kernel)


def _view(site: Site, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The diffusers parameter's shape within the original ``shape`` (None: ``shape`` cannot hold it)."""
    if site.chunk is not None:
        return (shape[0] // site.chunks, *shape[1:]) if shape[0] % site.chunks == 0 else None
    return shape[::-1] if site.transpose else shape


def _misfit(geometry: _Geometry, site: Site, shape: tuple[int, ...] | None) -> str | None:
    """Why a layer of ``geometry`` cannot adapt ``site`` of the model's ``shape``, or None."""
    if shape is None:
        return f"adapts '{site.key}', which is missing"
    view = _view(site, shape) if len(shape) >= 2 else None
    fits = (
        view is not None
        and view[0] == geometry.out
        and math.prod(view[1:]) == geometry.features
        and not (len(view) == 4 and len(geometry.kernel) == 3 and view[1:] != geometry.kernel)
    )
    if fits:
        return None
    part = "" if site.chunk is None else f"rows {site.chunk + 1} of {site.chunks} of "
    return f"is {geometry.out}×{geometry.features} but {part}'{site.key}' is {list(shape)}"


def _other_families(arch: Architecture) -> list[Architecture]:
    return [other for _, other in ARCHITECTURES.items() if other.name != arch.name]


def _fits(modules: Mapping[str, _Module], infos: Mapping[str, tuple[int, ...]], arch: Architecture) -> bool:
    """Whether every layer names a weight of ``arch`` and fits it in a real-size checkpoint."""
    index, shapes = name_index(arch), real_shapes(arch)
    for name, module in modules.items():
        site, geometry = index.by_name.get(name), _geometry(module, infos)
        if site is None or isinstance(geometry, str) or _misfit(geometry, site, shapes.get(site.key)):
            return False
    return True


def _map_names(
    path: Path, modules: Mapping[str, _Module], infos: Mapping[str, tuple[int, ...]], arch: Architecture
) -> dict[str, Site]:
    """Module name → site in ``arch``; an unknown name says which family the file looks made for."""
    index = name_index(arch)
    unknown = [name for name in sorted(modules) if name not in index.by_name]
    if unknown:
        named = [
            other for other in _other_families(arch) if all(n in name_index(other).by_name for n in modules)
        ]
        fitting = [other for other in named if _fits(modules, infos, other)]
        if named:
            titles = " or ".join(other.title for other in fitting or named)
            raise ConfigError(
                f"{path}: looks like a LoRA for {titles}, not for this {arch.title} model (its layer "
                f"'{unknown[0]}' is not one of {arch.title}); use a LoRA made for {arch.title}"
            )
        raise ConfigError(
            f"{path}: layer '{unknown[0]}' names no weight of a {arch.title} model"
            f"{did_you_mean(unknown[0], index.by_name)} ({len(unknown)} of {len(modules)} layers unknown); "
            f"use a LoRA made for {arch.title}"
        )
    sites = {name: index.by_name[name] for name in sorted(modules)}
    seen: dict[tuple[str, int | None], str] = {}
    for name, site in sites.items():
        other = seen.setdefault((site.key, site.chunk), name)
        if other != name:
            raise ConfigError(f"{path}: layers '{other}' and '{name}' both adapt '{site.key}'; keep one")
    return sites


def _check_shapes(
    path: Path,
    modules: Mapping[str, _Module],
    sites: Mapping[str, Site],
    infos: Mapping[str, tuple[int, ...]],
    arch: Architecture,
    shapes: Mapping[str, tuple[int, ...]] | None,
) -> dict[str, _Geometry]:
    """Each layer's geometry, checked against ``shapes`` (default: a real-size ``arch`` checkpoint)."""
    model = real_shapes(arch) if shapes is None else shapes
    geometries = {}
    for name, site in sites.items():
        geometry = _geometry(modules[name], infos)
        if isinstance(geometry, str):
            raise ConfigError(f"{path}: {geometry}; the file is damaged or not a LoRA")
        problem = _misfit(geometry, site, model.get(site.key))
        if problem is not None:
            others = [other.title for other in _other_families(arch) if _fits(modules, infos, other)]
            looks = f"; it looks like a LoRA for {' or '.join(others)}" if others else ""
            raise ConfigError(
                f"{path}: layer '{name}' {problem} in this {arch.title} model{looks}; "
                f"use a LoRA made for this model"
            )
        geometries[name] = geometry
    return geometries


def _peft_config(path: Path, metadata: Mapping[str, str], component: str) -> dict[str, Any]:
    """The PEFT LoraConfig diffusers stores in the header for ``component`` (empty if none)."""
    data = header_json_object(metadata, PEFT_METADATA_KEY, path=path) or {}
    prefixed = {k[len(component) + 1 :]: v for k, v in data.items() if k.startswith(component + ".")}
    return prefixed or {k: v for k, v in data.items() if "." not in k}


def _peft_scale(path: Path, config: Mapping[str, Any], site: Site, rank: int) -> float | None:
    """lora_alpha (or its ``alpha_pattern`` entry, matched as PEFT does) over the rank (√rank with
    ``use_rslora``); None when the config has no alpha."""
    if config.get("use_dora"):
        raise ConfigError(f"{path}: is a DoRA adapter (use_dora), which automerge does not support yet")
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", site.module):
            alpha = value
            break
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise ConfigError(f"{path}: '{PEFT_METADATA_KEY}' gives lora_alpha {alpha!r}, not a number")
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _alpha_scale(path: Path, checkpoint: Checkpoint, module: _Module, rank: int) -> float | None:
    """alpha / rank from the module's alpha tensor (None without one)."""
    if "alpha" not in module.parts:
        return None
    key = module.parts["alpha"]
    value = checkpoint.load(key)
    if value.numel() != 1:
        raise ConfigError(f"{path}: '{key}' has shape {list(value.shape)}; an alpha is one number")
    alpha = float(value.to(torch.float64).item())
    if not math.isfinite(alpha) or alpha == 0:
        raise ConfigError(
            f"{path}: '{key}' is {alpha}; kohya reads alpha 0 as the rank, ComfyUI and A1111 as 0, so it "
            "is ambiguous: set it to the rank for scale 1"
        )
    return alpha / rank


def _fold_mid(down: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """LoCon's CP/Tucker conv (1×1 down, kh×kw mid) as one down [rank, in, kh, kw], float32."""
    return torch.einsum("mjhw,ji->mihw", mid.to(torch.float32), down.to(torch.float32).flatten(1))


def _layer(
    path: Path,
    checkpoint: Checkpoint,
    module: _Module,
    site: Site,
    geometry: _Geometry,
    peft: Mapping[str, Any],
) -> LoraLayer:
    up, down = checkpoint.load(module.parts["up"]), checkpoint.load(module.parts["down"])
    rank = int(down.shape[0])
    if "mid" in module.parts:
        down = _fold_mid(down, checkpoint.load(module.parts["mid"]))
    scale = _alpha_scale(path, checkpoint, module, rank)
    if scale is None:
        scale = _peft_scale(path, peft, site, rank)
    rows = None if site.chunk is None else (site.chunk * geometry.out, (site.chunk + 1) * geometry.out)
    kernel = tuple(down.shape[2:]) if down.ndim == 4 else None
    return LoraLayer(
        site.key,
        up.flatten(1),
        down.flatten(1),
        1.0 if scale is None else scale,
        rows,
        site.transpose,
        kernel,
    )


def _require_safetensors(path: Path) -> None:
    if path.is_dir() or not path.exists():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ConfigError(f"LoRA {path} {what}; give a LoRA .safetensors file")
    if path.suffix.lower() != ".safetensors":
        raise ConfigError(
            f"LoRA {path} is not a .safetensors file; automerge reads LoRAs from safetensors only (a "
            ".pt/.ckpt/.bin file is a pickle, which can run code when loaded): convert it to safetensors"
        )


def read_lora(path: Path, arch: Architecture, *, shapes: Mapping[str, tuple[int, ...]] | None = None) -> Lora:
    """The LoRA file ``path`` as layers on ``arch``'s original-layout keys.

    ``shapes``: the shapes of the checkpoint it will be applied to (original key → shape, e.g. from its
    header); default: those of a real-size ``arch`` checkpoint (its configs built on the meta device:
    diffusers is imported, a few seconds the first time).
    """
    # 1. The file: safetensors only, its header read and checked before any tensor.
    path = Path(path)
    _require_safetensors(path)
    with open_safetensors(path) as checkpoint:
        keys = checkpoint.keys()
        infos = {key: checkpoint.info(key).shape for key in keys}
        # 2. Tensor names → modules, one key format, every module a known layer of this family.
        modules = _group(path, keys)
        fmt = _format(path, modules)
        sites = _map_names(path, modules, infos, arch)
        # 3. Shapes against the model's (or a real-size model's), then the tensors.
        geometries = _check_shapes(path, modules, sites, infos, arch, shapes)
        peft = {c: _peft_config(path, checkpoint.metadata, c) for c in {s.component for s in sites.values()}}
        layers: dict[str, list[LoraLayer]] = {}
        for name, site in sites.items():
            layer = _layer(path, checkpoint, modules[name], site, geometries[name], peft[site.component])
            layers.setdefault(site.key, []).append(layer)
    ordered = {
        key: tuple(sorted(found, key=lambda layer: layer.rows or (0, 0))) for key, found in layers.items()
    }
    return Lora(path, fmt, ordered)
