"""Real key tables (names, shapes, dtypes) of SD1 and SDXL single-file checkpoints, from sd-mecha
(MIT, Copyright (c) 2023 ljleb), packaged as JSON in ``data/``. SD2's table is derived from SD1's
with the OpenCLIP-H text tower (24 resblocks) in place of CLIP-L."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

_FILES = {"sd1": "sd1-ldm.json", "sdxl": "sdxl-sgm.json"}


@dataclass(frozen=True)
class ReferenceKey:
    key: str
    shape: tuple[int, ...]
    dtype: str
    optional: bool
    component: str


def _load(name: str) -> dict[str, dict[str, list]]:
    text = resources.files("automerge.arch").joinpath("data", _FILES[name]).read_text()
    return json.loads(text)["components"]


def reference_keys(family: str, *, components: tuple[str, ...] | None = None) -> list[ReferenceKey]:
    """Every key of a real ``family`` checkpoint ("sd1", "sd2", "sdxl"), optionally some components."""
    if family == "sd2":
        return _sd2_keys(components)
    table = _load(family)
    return [
        ReferenceKey(key, tuple(shape), dtype, optional, component)
        for component, keys in table.items()
        if components is None or component in components
        for key, (shape, dtype, optional) in keys.items()
    ]


def _sd2_keys(components: tuple[str, ...] | None) -> list[ReferenceKey]:
    """SD1's UNet and VAE keys (same names) + OpenCLIP-H: SDXL's clip_g names, 24 resblocks, width 1024."""
    keep = tuple(c for c in (components or ("diffuser", "vae", "scheduler", "open_clip")) if c != "clip_l")
    out = [k for k in reference_keys("sd1", components=keep) if k.component != "clip_l"]
    if "open_clip" in keep or components is None:
        for ref in reference_keys("sdxl", components=("clip_g",)):
            rest = ref.key.removeprefix("conditioner.embedders.1.model.")
            if rest.startswith("transformer.resblocks.") and int(rest.split(".")[2]) >= 24:
                continue
            out.append(
                ReferenceKey("cond_stage_model.model." + rest, (), ref.dtype, ref.optional, "open_clip")
            )
    return out
