"""Real key tables (names, shapes, dtypes) of single-file checkpoints: SD1's and SDXL's from sd-mecha
(MIT, Copyright (c) 2023 ljleb), packaged as JSON in ``data/``. A family's data file says which parts of
which tables make its table (SD2: SD1's UNet and VAE + SDXL's OpenCLIP names, 24 resblocks)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources

from automerge.arch._base import ARCHITECTURES
from automerge.arch._schema import ReferencePart

_RESBLOCK = re.compile(r"\.resblocks\.(\d+)\.")


@dataclass(frozen=True)
class ReferenceKey:
    key: str
    shape: tuple[int, ...]
    dtype: str
    optional: bool
    component: str


def _load(table: str) -> dict[str, dict[str, list]]:
    text = resources.files("automerge.arch").joinpath("data", table).read_text()
    return json.loads(text)["components"]


def _part_keys(part: ReferencePart) -> Iterator[ReferenceKey]:
    """The keys one part of a family's table contributes, in the table's order."""
    for component, keys in _load(part.table).items():
        if part.components is not None and component not in part.components:
            continue
        for key, (shape, dtype, optional) in keys.items():
            if part.prefix is not None:
                key = part.prefix.new + key.removeprefix(part.prefix.old)
            block = _RESBLOCK.search(key)
            if part.resblocks is not None and block is not None and int(block[1]) >= part.resblocks:
                continue
            shown = tuple(shape) if part.shapes else ()
            yield ReferenceKey(key, shown, dtype, optional, part.component or component)


def reference_keys(family: str, *, components: tuple[str, ...] | None = None) -> list[ReferenceKey]:
    """Every key of a real ``family`` checkpoint ("sd1", "sd2", "sdxl"), optionally some components."""
    return [
        ref
        for part in ARCHITECTURES.get(family).reference
        for ref in _part_keys(part)
        if components is None or ref.component in components
    ]
