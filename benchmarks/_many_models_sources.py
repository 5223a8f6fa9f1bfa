"""many_models' sources: fine-tunes of one base (base + small seeded noise), written once into the work
folder and reused, named a, b, c (the base), d, …, z, aa, ab, … as recipes name models.

- tiny SDXL: ``automerge.tiny.write_tiny`` (every key name of a real SDXL file, tiny widths, ~11.5 MB);
  the base is ``write_tiny(seed=0)``, model i is ``write_tiny(seed=i, like=base)`` (base +
  0.05·σ(tensor)·ε per key);
- real-size SD1: random fp16 weights at every real key shape (``_sources.real_infos``, ~2.13 GB each);
  the base is ``_sources.write_random_source`` (σ 0.02), model i is base + 0.002·ε (seed i).
"""

from __future__ import annotations

import string
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from _sources import SEED_KEY, STD_KEY, random_tensor, real_infos, same_source, write_random_source
from safetensors import safe_open

from automerge.checkpoints import SafetensorsWriter
from automerge.tiny import write_tiny

BASE = "c"
TINY_DELTA = 0.05  # write_tiny's noise: delta·σ(tensor)·ε
REAL_STD, REAL_NOISE = 0.02, 0.002  # real-size base σ, fine-tune noise σ
LIKE_KEY = "benchmarks.like"


def model_names(count: int) -> list[str]:
    """The first ``count`` model names: a … z, then aa … az, ba … (as spreadsheet columns)."""
    letters = string.ascii_lowercase
    names: list[str] = []
    width = 1
    while len(names) < count:
        names.extend(_words(letters, width))
        width += 1
    return names[:count]


def _words(letters: str, width: int) -> Iterable[str]:
    if width == 1:
        yield from letters
        return
    for head in letters:
        for tail in _words(letters, width - 1):
            yield head + tail


def _seed(names: Sequence[str], name: str) -> int:
    return 0 if name == BASE else names.index(name) + 1


# -- tiny SDXL --------------------------------------------------------------------------------------


def tiny_sources(folder: Path, count: int) -> dict[str, Path]:
    """``count`` tiny SDXL sources in ``folder`` (the base c and fine-tunes of it), each written unless
    the file is already there with the same seed."""
    folder.mkdir(parents=True, exist_ok=True)
    names = model_names(count)
    paths = {name: folder / f"tiny-sdxl-{name}.safetensors" for name in names}
    base = folder / f"tiny-sdxl-{BASE}.safetensors"
    started, written = time.perf_counter(), 0
    for name in [BASE, *(n for n in names if n != BASE)]:  # the base first: the others are "like" it
        path, seed, like = paths[name], _seed(names, name), None if name == BASE else base
        title = f"automerge tiny sdxl (seed {seed}{', like ' + base.name if like else ''})"
        if _title(path) == title:
            continue
        write_tiny("sdxl", path, seed=seed, like=like, delta=TINY_DELTA)
        written += 1
    if written:
        print(f"  wrote {written} tiny SDXL sources ({time.perf_counter() - started:.0f} s)")
    return paths


def _title(path: Path) -> str | None:
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        return (handle.metadata() or {}).get("modelspec.title")


# -- real-size SD1 ----------------------------------------------------------------------------------


def real_sd1_sources(folder: Path, count: int) -> dict[str, Path]:
    """``count`` real-size SD1 sources in ``folder``: a random base c and base + noise fine-tunes,
    each written unless a file with the same seed, σ and base is already there."""
    folder.mkdir(parents=True, exist_ok=True)
    names = model_names(count)
    paths = {name: folder / f"real-sd1-{name}.safetensors" for name in names}
    base = folder / f"real-sd1-{BASE}.safetensors"
    for name in [BASE, *(n for n in names if n != BASE)]:
        path, seed = (base, 0) if name == BASE else (paths[name], _seed(names, name))
        if name == BASE and same_source(base, "sd1", seed=0, std=REAL_STD):
            continue
        if name != BASE and _same_finetune(path, seed=seed, like=base):
            continue
        started = time.perf_counter()
        if name == BASE:
            write_random_source("sd1", base, seed=0, std=REAL_STD, device="cpu")
        else:
            write_finetune(path, like=base, seed=seed)
        print(f"  wrote {path} ({path.stat().st_size / 1e9:.2f} GB, {time.perf_counter() - started:.0f} s)")
    return paths


def write_finetune(path: Path, *, like: Path, seed: int) -> Path:
    """``like`` + REAL_NOISE·ε (ε ~ N(0, 1) from one generator seeded ``seed``) for every float tensor."""
    infos = real_infos("sd1")
    generator = torch.Generator().manual_seed(seed)
    metadata = {SEED_KEY: str(seed), STD_KEY: repr(REAL_NOISE), LIKE_KEY: like.name}
    with (
        safe_open(str(like), framework="pt") as base,
        SafetensorsWriter(path, infos, metadata=metadata) as out,
    ):
        for key, info in infos.items():
            tensor = base.get_tensor(key)
            if tensor.is_floating_point():
                tensor = random_tensor(info, generator=generator, std=REAL_NOISE).add_(tensor)
            out.write(key, tensor)
    return path


def _same_finetune(path: Path, *, seed: int, like: Path) -> bool:
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        keys = set(handle.keys())
    expected = {SEED_KEY: str(seed), STD_KEY: repr(REAL_NOISE), LIKE_KEY: like.name}
    return all(metadata.get(k) == v for k, v in expected.items()) and keys == set(real_infos("sd1"))


# -- the page cache ---------------------------------------------------------------------------------


def read_through(paths: Iterable[Path]) -> tuple[int, float]:
    """read() every byte of ``paths`` once (into one reused 16 MiB buffer) so that they are in the
    page cache; (bytes, seconds)."""
    buffer = bytearray(1 << 24)
    total, started = 0, time.perf_counter()
    for path in paths:
        with path.open("rb", buffering=0) as file:
            while read := file.readinto(buffer):
                total += read
    return total, time.perf_counter() - started


def available_memory_bytes() -> int:
    """MemAvailable of /proc/meminfo: what the page cache can hold without evicting the sources."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0
