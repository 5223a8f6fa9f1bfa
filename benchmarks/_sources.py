"""Benchmark fixtures at real size: source checkpoints of random weights at every real key shape of a
family (from ``automerge.arch.reference_keys``), written once and reused, and the copy floor that a
live re-merge is measured against.

A source is what a real single-file checkpoint of the family holds, minus EMA and scheduler buffers:
floats as fp16 σ·N(0, 1) (drawn in chunks from one seeded generator on the device), position ids
0…76 as int64, markers (v_pred, edm_vpred.*) left out, as ``automerge.tiny`` does. There is no
``automerge.configs`` header, so the family's standard (real-size) configs are used.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from automerge.arch import ARCHITECTURES, reference_keys
from automerge.checkpoints import SafetensorsWriter, TensorInfo, open_safetensors

CHUNK = 1 << 24  # elements per random draw
SEED_KEY, STD_KEY = "benchmarks.seed", "benchmarks.std"  # header fields: a file is reused when they match


def real_infos(family: str) -> dict[str, TensorInfo]:
    """Every key of a real ``family`` file at its real shape, floats as fp16; no EMA, no scheduler."""
    arch = ARCHITECTURES.get(family)
    infos = {}
    for ref in reference_keys(family):
        if ref.component in ("ema", "scheduler"):
            continue
        if ref.key.endswith("position_ids"):
            infos[ref.key] = TensorInfo(ref.shape, torch.int64)
        elif ref.dtype == "float32" and arch.component_of(ref.key) is not None:
            infos[ref.key] = TensorInfo(ref.shape, torch.float16)
    return dict(sorted(infos.items()))


def random_tensor(info: TensorInfo, *, generator: torch.Generator, std: float) -> torch.Tensor:
    """std·N(0, 1) in ``info.dtype`` on the CPU, drawn in chunks on the generator's device; position
    ids 0…76."""
    if info.dtype == torch.int64:
        return torch.arange(info.shape[-1], dtype=torch.int64).expand(info.shape).contiguous()
    out = torch.empty(info.shape, dtype=info.dtype)
    flat = out.view(-1)
    for start in range(0, flat.numel(), CHUNK):
        count = min(CHUNK, flat.numel() - start)
        draw = torch.randn(count, generator=generator, dtype=info.dtype, device=generator.device)
        flat[start : start + count].copy_(draw.mul_(std))
    return out


def write_random_source(family: str, path: Path, *, seed: int, std: float, device: str) -> Path:
    """A real-size ``family`` checkpoint of random weights, streamed to ``path`` atomically; seed and
    σ in the header."""
    infos = real_infos(family)
    where = "cuda" if torch.device(device).type == "cuda" else "cpu"
    generator = torch.Generator(device=where).manual_seed(seed)
    metadata = {SEED_KEY: str(seed), STD_KEY: repr(std), "modelspec.title": f"random {family} seed {seed}"}
    with SafetensorsWriter(path, infos, metadata=metadata) as writer:
        for key, info in infos.items():
            writer.write(key, random_tensor(info, generator=generator, std=std))
    return path


def same_source(path: Path, family: str, *, seed: int, std: float) -> bool:
    """``path`` holds what ``write_random_source`` would write now (header check only)."""
    if not path.is_file():
        return False
    infos = real_infos(family)
    with open_safetensors(path) as checkpoint:
        metadata = checkpoint.metadata
        if metadata.get(SEED_KEY) != str(seed) or metadata.get(STD_KEY) != repr(std):
            return False
        return checkpoint.keys() == sorted(infos) and all(checkpoint.info(k) == i for k, i in infos.items())


def real_sources(
    family: str, folder: Path, seeds: Mapping[str, int], *, std: float = 0.02, device: str = "cpu"
) -> dict[str, Path]:
    """``real-<family>-<letter>.safetensors`` in ``folder`` for each letter and seed of ``seeds``,
    written unless a file with the same seed and σ is already there."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {letter: folder / f"real-{family}-{letter}.safetensors" for letter in seeds}
    for letter, path in paths.items():
        if same_source(path, family, seed=seeds[letter], std=std):
            print(f"  reusing {path}")
            continue
        started = time.perf_counter()
        write_random_source(family, path, seed=seeds[letter], std=std, device=device)
        print(f"  wrote {path} ({path.stat().st_size / 1e9:.2f} GB, {time.perf_counter() - started:.1f} s)")
    return paths


def _filled(numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``numel`` finite non-constant values, made fast (one random chunk repeated)."""
    size = min(CHUNK, numel)
    chunk = torch.randn(size, device=device).to(dtype)
    return chunk.repeat(numel // size + 1)[:numel].clone()


@dataclass
class CopyFloor:
    """Three flat buffers of the live dtype on the device: ``add(n)`` is ``torch.add(a, b, out=o)``
    over ``n`` elements, 2 reads + 1 write, the bytes a weighted sum of ``n`` elements must move."""

    a: torch.Tensor
    b: torch.Tensor
    out: torch.Tensor

    @classmethod
    def allocate(cls, numel: int, *, dtype: torch.dtype, device: torch.device | str) -> CopyFloor:
        a = _filled(numel, dtype, device)
        return cls(a, a.clone(), torch.empty_like(a))

    def add(self, numel: int) -> None:
        torch.add(self.a[:numel], self.b[:numel], out=self.out[:numel])
