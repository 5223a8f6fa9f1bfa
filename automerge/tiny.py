"""``automerge tiny``: checkpoints with the real topology of a family (every key name of a real single-file
checkpoint, tiny widths), written in the original layout like a real file, a few MB.

The live modules are built from tiny configs with a seeded default init, then written back into the
original layout through the same key rules the loader uses; the configs travel in the header
(``automerge.configs``) so the loader can rebuild the modules. ``--like`` makes a "fine-tune":
base + delta·σ(tensor)·ε with ε ~ N(0, 1) seeded per key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch

from automerge.arch import ARCHITECTURES, Architecture, Target, View, detect_architecture, reference_keys
from automerge.checkpoints import CONFIGS_METADATA_KEY, open_file_checkpoint, save_safetensors
from automerge.dtypes import torch_dtype
from automerge.errors import ConfigError
from automerge.render.modules import build_modules, live_name

_SCHEDULE_KEYS = ("betas", "alphas_cumprod", "alphas_cumprod_prev")


def _key_seed(seed: int, key: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _schedule_buffers() -> dict[str, torch.Tensor]:
    """SD's scaled-linear schedule (β from 0.00085 to 0.012 over 1000 steps), ᾱ_t = Π(1 − β)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return {
        "betas": betas.float(),
        "alphas_cumprod": alphas_cumprod.float(),
        "alphas_cumprod_prev": previous.float(),
    }


def _original_tensor(
    targets: tuple[Target, ...], live: Mapping[str, Mapping[str, torch.Tensor]]
) -> torch.Tensor:
    """Rebuild an original-layout tensor from the live parameters it feeds (inverse of the views)."""
    first = targets[0]
    parts = [live[t.component][t.name] for t in targets]
    if first.view is View.ROWS:
        return torch.cat(parts, dim=0)
    if first.view is View.SQUEEZE:
        return parts[0][:, :, None, None]
    if first.view is View.TRANSPOSE:
        return parts[0].t()
    return parts[0]


def _fallback_shape(key: str, known: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """Shape of a tensor that no live parameter uses (SD2's last OpenCLIP block, logit_scale)."""
    if key.endswith("logit_scale"):
        return ()
    if ".resblocks." in key:
        head, rest = key.split(".resblocks.", 1)
        return tuple(known[f"{head}.resblocks.0.{rest.split('.', 1)[1]}"].shape)
    if key.endswith("text_projection"):
        width = known[key.replace("text_projection", "ln_final.weight")].shape[0]
        return (width, width)
    raise KeyError(key)


def make_tiny_state_dict(arch: Architecture, *, seed: int) -> dict[str, torch.Tensor]:
    """Every non-EMA key of a real ``arch`` checkpoint, at tiny widths, float32."""
    configs = arch.tiny_configs
    torch.manual_seed(seed)
    modules = build_modules(configs)
    live = {name: _canonical_state(module) for name, module in modules.items()}
    out: dict[str, torch.Tensor] = {}
    schedule = _schedule_buffers()
    deferred: list[str] = []
    for ref in reference_keys(arch.name):
        if ref.component in ("ema",):
            continue
        if ref.key.endswith("position_ids"):
            out[ref.key] = torch.arange(77, dtype=torch.int64)[None]
        elif ref.component == "scheduler":
            if ref.key in schedule:
                out[ref.key] = schedule[ref.key]
        elif ref.dtype != "float32" or arch.component_of(ref.key) is None:
            continue  # optional markers such as v_pred / edm_vpred.*
        elif targets := arch.targets(ref.key):
            out[ref.key] = _original_tensor(targets, live).float().clone()
        else:
            deferred.append(ref.key)
    generator = torch.Generator().manual_seed(seed)
    for key in deferred:
        out[key] = torch.randn(_fallback_shape(key, out), generator=generator) * 0.02
    return dict(sorted(out.items()))


def _canonical_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state under converter-style names (``text_model.`` kept for CLIP text models)."""
    state = module.state_dict()
    if live_name(module, "text_model.x") == "text_model.x":
        return state
    return {"text_model." + name: tensor for name, tensor in state.items()}


def perturb(tensors: Mapping[str, torch.Tensor], *, seed: int, delta: float) -> dict[str, torch.Tensor]:
    """A seeded "fine-tune": t + delta·σ(t)·ε for every float tensor (σ = 1 for constant tensors)."""
    out = {}
    for key, tensor in tensors.items():
        if tensor.dtype.is_floating_point and tensor.numel() > 1 and key not in _SCHEDULE_KEYS:
            work = tensor.float()
            scale = work.std().item() or 1.0
            noise = torch.randn(work.shape, generator=torch.Generator().manual_seed(_key_seed(seed, key)))
            out[key] = (work + delta * scale * noise).to(tensor.dtype)
        else:
            out[key] = tensor
    return out


def write_tiny(
    family: str,
    path: Path,
    *,
    seed: int = 0,
    like: Path | None = None,
    delta: float = 0.05,
    dtype: str = "fp16",
) -> Path:
    """Write a tiny checkpoint of ``family`` (or a perturbed copy of ``like``) to ``path``."""
    target = torch_dtype(dtype, where="--dtype")
    arch = ARCHITECTURES.get(family)
    if not delta > 0:
        raise ConfigError(f"--delta must be greater than 0 (a noise scale), got {delta}")
    if like is not None:
        with open_file_checkpoint(like) as base:
            if CONFIGS_METADATA_KEY not in base.metadata:
                raise ConfigError(f"{like}: --like takes a tiny model written by `automerge tiny`")
            found = detect_architecture(base.keys(), lambda key: base.info(key).shape, source=str(like))
            if found.name != arch.name:
                raise ConfigError(
                    f"{like}: --like is a tiny {found.name} model, not {family}; ask for {found.name}"
                )
            configs = json.loads(base.metadata[CONFIGS_METADATA_KEY])
            tensors = perturb({k: base.load(k) for k in base.keys()}, seed=seed, delta=delta)
    else:
        configs = dict(arch.tiny_configs)
        tensors = make_tiny_state_dict(arch, seed=seed)
    tensors = {
        k: v.to(target) if k not in _SCHEDULE_KEYS and v.dtype.is_floating_point else v
        for k, v in tensors.items()
    }
    metadata = {
        CONFIGS_METADATA_KEY: json.dumps(configs, sort_keys=True),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch.modelspec_architecture,
        "modelspec.implementation": "automerge-tiny",
        "modelspec.title": f"automerge tiny {family} (seed {seed}{', like ' + Path(like).name if like else ''})",
    }
    save_safetensors(path, tensors, metadata=metadata)
    return path
