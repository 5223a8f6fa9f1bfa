"""merge_speed (and export_overlap), streaming export: ``export_merge`` in a fresh subprocess against
the read+write floor, with a cold or a warm sha256 cache, in ABBA order; the subprocess's peak RssAnon.

The read+write floor reads every tensor of every source with safetensors and writes A's tensors with
``save_file`` + fsync (the exporter fsyncs). ``get_tensor`` returns tensors backed by the memory map
(safetensors 0.8), so a bare call reads nothing: each tensor is copied into one reused buffer, which
reads its bytes once (as the exporter must) without paying for fresh memory.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import (
    ROOT,
    HostMemorySampler,
    Timing,
    device_peak,
    environment,
    reset_device_peak,
    rss_anon_bytes,
    seconds,
)
from _merge_live import make_plan
from safetensors import safe_open
from safetensors.torch import save_file

from automerge.checkpoints import CACHE_DIR_VARIABLE, cached_sha256, sha256_file
from automerge.merge import MergePlan, export_merge

SCRIPT = Path(__file__).resolve().parent / "merge_speed.py"  # runs export_child with --export-child


@dataclass(frozen=True)
class FloorRun:
    read_s: float  # get_tensor of every key of every source, copied into one reused buffer
    write_s: float  # save_file of A's tensors
    fsync_s: float
    bytes_read: int
    bytes_written: int
    sequential_read_s: float  # for comparison only: read() of the three files into one reused buffer

    @property
    def total_s(self) -> float:
        return self.read_s + self.write_s + self.fsync_s


def read_write_floor(sources: Mapping[str, Path], out: Path) -> FloorRun:
    """Read every tensor of every source with safetensors, then write A's tensors with save_file + fsync."""
    with ExitStack() as stack:
        handles = {
            k: stack.enter_context(safe_open(str(p), framework="pt", device="cpu"))
            for k, p in sources.items()
        }
        started = time.perf_counter()
        kept: dict[str, torch.Tensor] = {}
        scratch = torch.empty(0, dtype=torch.uint8)
        for letter, handle in handles.items():
            for key in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                raw = handle.get_tensor(key).reshape(-1).view(torch.uint8)
                if raw.numel() > scratch.numel():
                    scratch = torch.empty(raw.numel(), dtype=torch.uint8)
                scratch[: raw.numel()].copy_(raw)
                if letter == "a":
                    kept[key] = handle.get_tensor(key)
        read_s = time.perf_counter() - started
        read = sum(p.stat().st_size for p in sources.values())
        started = time.perf_counter()
        save_file(kept, str(out))
        write_s = time.perf_counter() - started
    started = time.perf_counter()
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_s = time.perf_counter() - started
    written = out.stat().st_size
    out.unlink()
    return FloorRun(
        read_s, write_s, fsync_s, read, written, sequential_read_s=sequential_read(sources.values())
    )


def sequential_read(paths: Iterable[Path]) -> float:
    """Seconds to read() every byte of ``paths`` into one reused 16 MiB buffer (no memory map)."""
    buffer = bytearray(1 << 24)
    started = time.perf_counter()
    for path in paths:
        with path.open("rb", buffering=0) as file:
            while file.readinto(buffer):
                pass
    return time.perf_counter() - started


@dataclass(frozen=True)
class ExportRun:
    export_s: float
    bytes_written: int
    anon_baseline_bytes: int  # after imports and opening the plan
    anon_peak_bytes: int  # during export_merge
    samples: int
    device_peak_bytes: int | None
    hash_cache: str  # "cold": an empty sha256 cache (first export of these files); "warm": filled
    hash_s: float | None = None  # sha256 of every source, uncached
    merge_only_s: float | None = None  # the merge loop without writing


@dataclass
class ExportResult:
    floors: list[FloorRun]
    exports: list[ExportRun]
    order: list[str]

    @property
    def floor(self) -> Timing:
        return Timing.of([run.total_s for run in self.floors])

    def export(self, hash_cache: str) -> Timing:
        return Timing.of([run.export_s for run in self.exports if run.hash_cache == hash_cache])

    def ratio(self, hash_cache: str) -> float:
        return self.export(hash_cache).median_s / self.floor.median_s

    # In the JSON (``jsonable`` writes properties): each sha256 cache's export timing and ratio.
    export_cold = property(lambda self: self.export("cold"))
    export_warm = property(lambda self: self.export("warm"))
    ratio_cold = property(lambda self: self.ratio("cold"))
    ratio_warm = property(lambda self: self.ratio("warm"))

    @property
    def anon_peak_bytes(self) -> int:
        return max(run.anon_peak_bytes for run in self.exports)


def measure_export(
    sources: Mapping[str, Path], folder: Path, *, pairs: int, device: str, threads: int | None
) -> ExportResult:
    """Warm the page cache with one floor read, then floor / cold export / warm export triples in
    ABBA order. A cold export starts from an empty sha256 cache (``automerge export`` of new files);
    a warm one finds the sources hashed (the end of ``automerge optimize``, whose study hashed them
    in the background)."""
    out = folder / "merge-speed-export.safetensors"
    read_write_floor(sources, out)  # warm-up: every source byte in the page cache, writer warmed
    warm_cache = folder / "hash-cache-warm"
    shutil.rmtree(warm_cache, ignore_errors=True)
    with environment(CACHE_DIR_VARIABLE, str(warm_cache)):
        for path in sources.values():
            cached_sha256(path)
    result = ExportResult([], [], [])
    for pair in range(pairs):
        order = ("floor", "cold", "warm") if pair % 2 == 0 else ("warm", "cold", "floor")
        for what in order:
            result.order.append(what)
            if what == "floor":
                result.floors.append(read_write_floor(sources, out))
                print(f"  floor: {result.floors[-1].total_s:.2f} s")
                continue
            cold_cache = folder / f"hash-cache-cold-{pair}"
            shutil.rmtree(cold_cache, ignore_errors=True)
            run = run_export_child(
                sources,
                out,
                device=device,
                breakdown=not result.exports,
                threads=threads,
                cache_dir=warm_cache if what == "warm" else cold_cache,
                hash_cache=what,
            )
            shutil.rmtree(cold_cache, ignore_errors=True)
            result.exports.append(run)
            print(f"  export, {what} sha256 cache: {run.export_s:.2f} s")
    return result


def run_export_child(
    sources: Mapping[str, Path],
    out: Path,
    *,
    device: str,
    breakdown: bool,
    threads: int | None,
    cache_dir: Path,
    hash_cache: str,
) -> ExportRun:
    """``export_child`` in a fresh interpreter, so its RssAnon holds no engine buffers; its sha256
    cache is ``cache_dir`` (``AUTOMERGE_CACHE_DIR``)."""
    payload = {
        "sources": {k: str(v) for k, v in sources.items()},
        "out": str(out),
        "device": device,
        "breakdown": breakdown,
        "threads": threads,
        "hash_cache": hash_cache,
    }
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--export-child", json.dumps(payload)],
        capture_output=True, text=True, check=False, cwd=ROOT,
        env={**os.environ, CACHE_DIR_VARIABLE: str(cache_dir)},
    )  # fmt: skip
    if completed.returncode != 0:
        raise RuntimeError(f"export subprocess failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    return ExportRun(**json.loads(completed.stdout.strip().splitlines()[-1]))


def export_child(payload: Mapping[str, Any]) -> ExportRun:
    """Export add_difference (α 0.5, fp16) once under the RssAnon sampler; optionally time its parts."""
    sources = {k: Path(v) for k, v in payload["sources"].items()}
    out, device = Path(payload["out"]), payload["device"]
    if payload["threads"]:
        torch.set_num_threads(payload["threads"])
    plan = make_plan(sources, "add_difference", {"alpha": 0.5})
    gc.collect()
    baseline = rss_anon_bytes()
    reset_device_peak(device)
    with HostMemorySampler() as sampler:
        export_s = seconds(lambda: export_merge(plan, out, dtype=torch.float16, device=device), device=device)
    written = out.stat().st_size
    out.unlink()
    hash_s = merge_only_s = None
    if payload["breakdown"]:
        hash_s = seconds(lambda: [sha256_file(path) for path in sources.values()], device=device)
        merge_only_s = seconds(lambda: _drain(_merged_tensors(plan, device)), device=device)
    plan.close()
    return ExportRun(
        export_s,
        written,
        baseline,
        sampler.anon_bytes,
        sampler.samples,
        device_peak(device),
        payload["hash_cache"],
        hash_s,
        merge_only_s,
    )


def _merged_tensors(plan: MergePlan, device: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The exporter's merge loop without the writer."""
    from automerge.merge import merged_tensors

    return merged_tensors(plan, dtype=torch.float16, device=device)


def _drain(tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    for _, tensor in tensors:
        tensor.cpu()
