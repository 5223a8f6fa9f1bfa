"""Merge speed (issue 3): live re-merge and streaming export against same-machine floors.

For a tiny model and a real-size model of ``--family`` (random fp16 weights at every real key shape
from ``automerge.arch.reference_keys``, EMA and scheduler buffers left out, no ``automerge.configs``
header so the standard configs are used) this measures, side by side in one run:

- live re-merge of every block (weighted sum, per-block α changed each repetition) against the copy
  floor ``torch.add(a, b, out=o)`` over one flat buffer of the same element count and dtype (reads 2
  copies, writes 1: the same bytes a weighted sum must move); one block alone (IN04 and the largest)
  against its byte share; add_difference and TIES over every block (informational, against the floor
  scaled to their minimum traffic of 3 reads + 1 write);
- ``export_merge`` (add_difference of a, b, c to fp16) in a fresh subprocess, against the read+write
  floor (``safe_open(...).get_tensor`` of every key of every source, each copied into one reused
  buffer so its bytes are really read, then ``save_file`` of A's tensors + fsync, as the exporter
  fsyncs). After one warm-up floor, triples of floor, cold export (empty sha256 cache, as the first
  ``automerge export`` of new files) and warm export (sources already hashed, as at the end of
  ``automerge optimize``) run in ABBA order; peak RssAnon (``/proc/self/status``, sampled every 5 ms)
  of that subprocess against its baseline after imports.

Medians of several repetitions after a warm-up. Prints a table, writes JSON (atomically)::

    python benchmarks/merge_speed.py --quick                 # tiny only, one torch thread, < 30 s
    python benchmarks/merge_speed.py                         # tiny + SD1-size on the CPU
    python benchmarks/merge_speed.py --device cuda --family sdxl --workdir /tmp/ms

Real-size sources are written once into ``--workdir`` and reused by later runs (a temporary folder,
deleted at the end, without it). On a machine that is shared, record the load: the JSON has it.

Not a test: timings are never asserted anywhere.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from _common import write_json  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from safetensors import safe_open
from safetensors.torch import save_file

from automerge.arch import ARCHITECTURES, reference_keys
from automerge.checkpoints import SafetensorsWriter, TensorInfo, cached_sha256, open_safetensors, sha256_file
from automerge.checkpoints._hashing import CACHE_DIR_VARIABLE
from automerge.merge.engine import EngineOptions, LiveEngine
from automerge.merge.export import export_merge, merged_tensors
from automerge.merge.params import BlockParams, resolve_params
from automerge.merge.recipe import MergePlan, plan_merge, recipe_from_data
from automerge.testing.tiny import write_tiny

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "merge_speed.json"
SOURCE = "merge_speed"  # names the recipes in error messages
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TARGET_RATIO = 1.5
TARGET_PEAK_BYTES = 2 * 1024**3
CHUNK = 1 << 24  # elements per random draw when generating sources
GB = 1e9
GIB = 1024**3


@dataclass(frozen=True)
class Settings:
    """What to run: device, family, live dtypes, repetitions."""

    device: str
    family: str
    dtype: str  # live dtype
    source_dtype: str
    reps: int  # weighted sum and copy floor
    slow_reps: int  # add_difference
    ties_reps: int  # 0 skips TIES
    export_pairs: int  # floor/export pairs, in ABBA order
    sizes: tuple[str, ...]  # "tiny", "real"
    workdir: Path | None
    threads: int | None = None  # torch intra-op threads (None: torch's default)

    def engine_options(self) -> EngineOptions:
        return EngineOptions(
            device=self.device, dtype=DTYPES[self.dtype], source_dtype=DTYPES[self.source_dtype]
        )


@dataclass(frozen=True)
class Timing:
    """Median and every run, in seconds."""

    median_s: float
    runs_s: tuple[float, ...]

    @classmethod
    def of(cls, runs: list[float]) -> Timing:
        return cls(statistics.median(runs), tuple(runs))


# -- clocks and memory -----------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], *, device: str) -> float:
    """Seconds for ``fn()``, the device synchronized before and after."""
    _sync(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - started


def rss_anon_bytes() -> int:
    """Anonymous resident memory of this process (RssAnon; memory-mapped file pages excluded)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class RssAnonSampler:
    """Background thread sampling ``rss_anon_bytes`` every ``interval_s``; ``peak`` after exit."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_bytes())
            self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssAnonSampler:
        self.peak = rss_anon_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_bytes())


def load_average() -> tuple[float, float, float]:
    """1, 5 and 15 minute load averages: other processes on a shared machine skew CPU timings."""
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return float(one), float(five), float(fifteen)


def _device_peak(device: str) -> int | None:
    return int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None


def _reset_device_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


# -- sources ---------------------------------------------------------------------------------------


def real_infos(family: str) -> dict[str, TensorInfo]:
    """Every key of a real ``family`` file at its real shape, floats as fp16; no EMA, no scheduler.

    As ``automerge.testing.tiny``: position_ids stay int64, markers (v_pred, edm_vpred.*) are left out.
    """
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


def random_tensor(info: TensorInfo, *, generator: torch.Generator) -> torch.Tensor:
    """0.02·N(0, 1) in fp16 (finite), drawn in chunks on the generator's device; position ids 0…76."""
    if info.dtype == torch.int64:
        return torch.arange(info.shape[-1], dtype=torch.int64).expand(info.shape).contiguous()
    out = torch.empty(info.shape, dtype=info.dtype)
    flat = out.view(-1)
    for start in range(0, flat.numel(), CHUNK):
        count = min(CHUNK, flat.numel() - start)
        draw = torch.randn(count, generator=generator, dtype=info.dtype, device=generator.device)
        flat[start : start + count].copy_(draw.mul_(0.02))
    return out


def write_random_source(family: str, path: Path, *, seed: int, device: str) -> Path:
    """A real-size ``family`` checkpoint of random fp16 weights, streamed to ``path`` (atomic)."""
    infos = real_infos(family)
    generator = torch.Generator(device=device if device.startswith("cuda") else "cpu").manual_seed(seed)
    metadata = {"modelspec.title": f"merge_speed random {family} seed {seed}"}
    with SafetensorsWriter(path, infos, metadata=metadata) as writer:
        for key, info in infos.items():
            writer.write(key, random_tensor(info, generator=generator))
    return path


def _matches(path: Path, infos: Mapping[str, TensorInfo]) -> bool:
    if not path.is_file():
        return False
    with open_safetensors(path) as checkpoint:
        return checkpoint.keys() == sorted(infos) and all(checkpoint.info(k) == i for k, i in infos.items())


def make_sources(size: str, family: str, folder: Path, *, device: str) -> dict[str, Path]:
    """Sources a, b, c: tiny (b, c perturbed copies of a) or real-size random (reused when present)."""
    paths = {letter: folder / f"{size}-{family}-{letter}.safetensors" for letter in "abc"}
    if size == "tiny":
        write_tiny(family, paths["a"], seed=0)
        write_tiny(family, paths["b"], seed=1, like=paths["a"])
        write_tiny(family, paths["c"], seed=2, like=paths["a"])
        return paths
    infos = real_infos(family)
    for seed, path in enumerate(paths.values()):
        if _matches(path, infos):
            print(f"  reusing {path}")
            continue
        started = time.perf_counter()
        write_random_source(family, path, seed=seed, device=device)
        print(f"  wrote {path} ({path.stat().st_size / GB:.2f} GB, {time.perf_counter() - started:.1f} s)")
    return paths


# -- live re-merge ---------------------------------------------------------------------------------


def make_plan(sources: Mapping[str, Path], method: str, params: Mapping[str, Any]) -> MergePlan:
    letters = "abc" if method != "weighted_sum" else "ab"
    data = {"models": {k: str(sources[k]) for k in letters}, "method": method, "params": dict(params)}
    return plan_merge(recipe_from_data(data, source=SOURCE), source=SOURCE)


def step_params(plan: MergePlan, step: int, *, only: str | None = None) -> BlockParams:
    """α per block (VAE named, so every block merges): 0.3 + 0.01·step + 0.001·i, never 0 or 1.

    ``only``: every block at step 0 except ``only``, at 0.7 + 0.01·step (one changed block per step).
    """
    alphas = {}
    for index, block in enumerate(plan.arch.blocks):
        current = step if only is None or block == only else 0
        base = 0.7 if only is not None and block == only else 0.3
        alphas[block] = round(base + 0.01 * current + 0.001 * index, 6)
    return resolve_params(plan.method, {"alpha": alphas}, blocks=plan.arch.blocks, source=SOURCE)


@dataclass
class FloorBuffers:
    """Three flat buffers of the live dtype: ``add(a, b, out=o)`` is the weighted sum's copy floor."""

    a: torch.Tensor
    b: torch.Tensor
    out: torch.Tensor

    @classmethod
    def allocate(cls, numel: int, *, dtype: torch.dtype, device: str) -> FloorBuffers:
        a = _filled(numel, dtype, device)
        return cls(a, a.clone(), torch.empty_like(a))

    def add(self, numel: int) -> None:
        torch.add(self.a[:numel], self.b[:numel], out=self.out[:numel])


def _filled(numel: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """``numel`` finite non-constant values, made fast (one random chunk repeated)."""
    size = min(CHUNK, numel)
    chunk = torch.randn(size, device=device).to(dtype)
    return chunk.repeat(numel // size + 1)[:numel].clone()


@dataclass
class BlockResult:
    block: str
    bytes: int  # of the block's output buffer
    byte_share: float  # of all blocks' bytes
    merge: Timing
    floor: Timing
    time_share: float  # median merge time / median all-block merge time

    @property
    def ratio(self) -> float:
        return self.merge.median_s / self.floor.median_s


@dataclass
class MethodResult:
    method: str
    blocks: int
    bytes_out: int
    streams: int  # buffers of bytes_out size moved: reads + 1 write
    merge: Timing
    floor_s: float  # measured add floor scaled to this method's traffic
    construct_s: float  # LiveEngine(...): reading, checking and packing the sources
    first_apply_s: float  # the warm-up: every block merged into untouched output buffers
    device_peak_bytes: int | None

    @property
    def ratio(self) -> float:
        return self.merge.median_s / self.floor_s


@dataclass
class LiveResult:
    weighted_sum: MethodResult
    floor: Timing  # torch.add over all blocks' elements
    floor_bytes_moved: int
    one_block: list[BlockResult]
    others: list[MethodResult] = field(default_factory=list)
    anon_after_engine_bytes: int = 0


def _build(plan: MergePlan, settings: Settings) -> tuple[LiveEngine, float]:
    _reset_device_peak(settings.device)
    started = time.perf_counter()
    engine = LiveEngine(plan, settings.engine_options())
    _sync(settings.device)
    return engine, time.perf_counter() - started


def measure_weighted_sum(sources: Mapping[str, Path], settings: Settings) -> LiveResult:
    """All-block and one-block weighted-sum re-merges, interleaved with the copy floor."""
    plan = make_plan(sources, "weighted_sum", {})
    engine, construct_s = _build(plan, settings)
    anon = rss_anon_bytes()
    block_bytes = engine.block_bytes()
    total_bytes = sum(block_bytes.values())
    itemsize = DTYPES[settings.dtype].itemsize
    numel = total_bytes // itemsize
    floor = FloorBuffers.allocate(numel, dtype=DTYPES[settings.dtype], device=settings.device)
    device = settings.device
    merged: set[str] = set()  # warm-up: every block, first touch of the output buffers
    first_apply_s = timed(lambda: merged.update(engine.apply(step_params(plan, 0))), device=device)
    assert merged == set(block_bytes), f"warm-up merged {sorted(merged)}, not every block"
    timed(lambda: floor.add(numel), device=device)
    merge_runs, floor_runs = [], []
    for step in range(1, settings.reps + 1):
        floor_runs.append(timed(lambda: floor.add(numel), device=device))
        params = step_params(plan, step)
        merge_runs.append(timed(partial(engine.apply, params), device=device))
    all_blocks = Timing.of(merge_runs)
    result = MethodResult(
        "weighted_sum", len(block_bytes), total_bytes, 3, all_blocks, statistics.median(floor_runs),
        construct_s, first_apply_s, _device_peak(device),
    )  # fmt: skip
    largest = max(block_bytes, key=lambda name: block_bytes[name])
    singles = [
        _one_block(engine, plan, floor, name, block_bytes, all_blocks, settings)
        for name in dict.fromkeys(("IN04", largest))
        if name in block_bytes
    ]
    live = LiveResult(result, Timing.of(floor_runs), 3 * total_bytes, singles, anon_after_engine_bytes=anon)
    plan.close()
    return live


def _one_block(
    engine: LiveEngine,
    plan: MergePlan,
    floor: FloorBuffers,
    block: str,
    block_bytes: Mapping[str, int],
    all_blocks: Timing,
    settings: Settings,
) -> BlockResult:
    """Re-merge ``block`` alone ``reps`` times (only its α changes) and its share of the copy floor."""
    device = settings.device
    numel = block_bytes[block] // DTYPES[settings.dtype].itemsize
    engine.apply(step_params(plan, 0, only=block))  # back to step 0 everywhere
    merge_runs, floor_runs = [], []
    for step in range(1, settings.reps + 1):
        params = step_params(plan, step, only=block)
        floor_runs.append(timed(lambda: floor.add(numel), device=device))
        merge_runs.append(timed(partial(engine.apply, params), device=device))
        assert engine._applied == params  # noqa: SLF001 (benchmark: confirm the step was applied)
    merge = Timing.of(merge_runs)
    total = sum(block_bytes.values())
    return BlockResult(
        block, block_bytes[block], block_bytes[block] / total, merge, Timing.of(floor_runs),
        merge.median_s / all_blocks.median_s,
    )  # fmt: skip


def measure_method(
    sources: Mapping[str, Path],
    method: str,
    *,
    reps: int,
    floor_seconds_per_byte: float,
    settings: Settings,
) -> MethodResult:
    """All-block re-merges of a 3-source method (3 reads + 1 write of the output's size at the floor)."""
    plan = make_plan(sources, method, {})
    engine, construct_s = _build(plan, settings)
    total_bytes = sum(engine.block_bytes().values())
    first_apply_s = timed(partial(engine.apply, step_params(plan, 0)), device=settings.device)  # warm-up
    runs = []
    for step in range(1, reps + 1):
        params = step_params(plan, step)
        runs.append(timed(partial(engine.apply, params), device=settings.device))
    result = MethodResult(
        method, len(engine.block_bytes()), total_bytes, 4, Timing.of(runs),
        floor_seconds_per_byte * 4 * total_bytes, construct_s, first_apply_s, _device_peak(settings.device),
    )  # fmt: skip
    plan.close()
    return result


def release(device: str) -> None:
    """Free the last phase's engine before the next one is built (cycles, CUDA cache)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def measure_live(sources: Mapping[str, Path], settings: Settings, *, size: str) -> LiveResult:
    """Weighted sum (with its floor and single blocks), then add_difference and TIES, one engine each."""
    live = measure_weighted_sum(sources, settings)
    release(settings.device)
    per_byte = live.floor.median_s / live.floor_bytes_moved
    print(
        f"  weighted_sum all blocks: {_ms(live.weighted_sum.merge.median_s)}, floor {_ms(live.floor.median_s)}"
    )
    methods = [
        ("add_difference", settings.slow_reps),
        ("ties", settings.ties_reps if size == "real" else settings.slow_reps),
    ]
    for method, reps in methods:
        if reps <= 0:
            continue
        result = measure_method(
            sources, method, reps=reps, floor_seconds_per_byte=per_byte, settings=settings
        )
        release(settings.device)
        live.others.append(result)
        print(f"  {method} all blocks: {_ms(result.merge.median_s)}")
    return live


# -- export ----------------------------------------------------------------------------------------


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
    """Read every tensor of every source with safetensors, then write A's tensors with save_file + fsync.

    ``get_tensor`` returns tensors backed by the memory map (safetensors 0.8), so a bare call reads
    nothing: each tensor is copied into one reused buffer, which reads its bytes once (as the exporter
    must) without paying for fresh memory. A's tensors are written as ``get_tensor`` returned them.
    """
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
    anon_baseline_bytes: int  # after imports and plan_merge
    anon_peak_bytes: int  # during export_merge
    samples: int
    device_peak_bytes: int | None
    hash_cache: str  # "cold": an empty sha256 cache (first export of these files); "warm": filled
    hash_s: float | None = None  # sha256 of every source, uncached
    merge_only_s: float | None = None  # merged_tensors without writing


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
    payload = json.dumps(
        {
            "sources": {k: str(v) for k, v in sources.items()},
            "out": str(out),
            "device": device,
            "breakdown": breakdown,
            "threads": threads,
            "hash_cache": hash_cache,
        }
    )
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--export-child", payload],
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
    _reset_device_peak(device)
    with RssAnonSampler() as sampler:
        export_s = timed(lambda: export_merge(plan, out, dtype="fp16", device=device), device=device)
    written = out.stat().st_size
    out.unlink()
    hash_s = merge_only_s = None
    if payload["breakdown"]:
        hash_s = timed(lambda: [sha256_file(path) for path in sources.values()], device=device)
        merge_only_s = timed(
            lambda: _drain(merged_tensors(plan, dtype=torch.float16, device=device)), device=device
        )
    plan.close()
    return ExportRun(
        export_s,
        written,
        baseline,
        sampler.peak,
        sampler.samples,
        _device_peak(device),
        payload["hash_cache"],
        hash_s,
        merge_only_s,
    )


def _drain(tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    for _, tensor in tensors:
        tensor.cpu()


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

    @property
    def export_cold(self) -> Timing:
        return self.export("cold")

    @property
    def export_warm(self) -> Timing:
        return self.export("warm")

    @property
    def ratio_cold(self) -> float:
        return self.ratio("cold")

    @property
    def ratio_warm(self) -> float:
        return self.ratio("warm")

    @property
    def anon_peak_bytes(self) -> int:
        return max(run.anon_peak_bytes for run in self.exports)


def measure_export(sources: Mapping[str, Path], folder: Path, settings: Settings) -> ExportResult:
    """Warm the page cache with one floor read, then floor / cold export / warm export triples in
    ABBA order. A cold export starts from an empty sha256 cache (``automerge export`` of new files);
    a warm one finds the sources hashed (the end of ``automerge optimize``, whose study hashed them
    in the background)."""
    out = folder / "merge-speed-export.safetensors"
    read_write_floor(sources, out)  # warm-up: every source byte in the page cache, writer warmed
    warm_cache = folder / "hash-cache-warm"
    shutil.rmtree(warm_cache, ignore_errors=True)
    with _environment(CACHE_DIR_VARIABLE, str(warm_cache)):
        for path in sources.values():
            cached_sha256(path)
    result = ExportResult([], [], [])
    for pair in range(settings.export_pairs):
        order = ("floor", "cold", "warm") if pair % 2 == 0 else ("warm", "cold", "floor")
        for what in order:
            if what == "floor":
                result.floors.append(read_write_floor(sources, out))
                result.order.append(what)
                print(f"  floor: {result.floors[-1].total_s:.2f} s")
                continue
            cache_dir = warm_cache if what == "warm" else folder / f"hash-cache-cold-{pair}"
            shutil.rmtree(folder / f"hash-cache-cold-{pair}", ignore_errors=True)
            run = run_export_child(
                sources,
                out,
                device=settings.device,
                breakdown=not result.exports,
                threads=settings.threads,
                cache_dir=cache_dir,
                hash_cache=what,
            )
            shutil.rmtree(folder / f"hash-cache-cold-{pair}", ignore_errors=True)
            result.exports.append(run)
            result.order.append(what)
            print(f"  export, {what} sha256 cache: {run.export_s:.2f} s")
    return result


@contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


# -- report ----------------------------------------------------------------------------------------


def machine_info(device: str) -> dict[str, Any]:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    info = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(ram / GIB, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _verdict(ratio: float) -> str:
    return "met" if ratio <= TARGET_RATIO else "missed"


def table_rows(size: str, live: LiveResult, export: ExportResult | None) -> list[tuple[str, ...]]:
    """(what, measured, floor, ratio, target/notes) rows for one model size."""
    ws = live.weighted_sum
    rows = [
        (
            f"{size}: weighted_sum, all {ws.blocks} blocks",
            _ms(ws.merge.median_s),
            f"{_ms(live.floor.median_s)} (add, {live.floor_bytes_moved / GB:.2f} GB moved)",
            f"{ws.ratio:.2f}×",
            f"≤ {TARGET_RATIO}×: {_verdict(ws.ratio)}",
        )
    ]
    for single in live.one_block:
        rows.append(
            (
                f"{size}: weighted_sum, {single.block} only",
                _ms(single.merge.median_s),
                _ms(single.floor.median_s),
                f"{single.ratio:.2f}×",
                f"time share {single.time_share:.1%} vs byte share {single.byte_share:.1%}",
            )
        )
    for other in live.others:
        rows.append(
            (
                f"{size}: {other.method}, all {other.blocks} blocks",
                _ms(other.merge.median_s),
                f"{_ms(other.floor_s)} (floor × 4/3, 3 reads + 1 write)",
                f"{other.ratio:.2f}×",
                "informational",
            )
        )
    if export is not None:
        first = export.exports[0]
        for hash_cache in ("cold", "warm"):
            rows.append(
                (
                    f"{size}: export add_difference fp16 (3 sources), {hash_cache} sha256 cache",
                    _ms(export.export(hash_cache).median_s),
                    f"{_ms(export.floor.median_s)} (read {export.floors[0].bytes_read / GB:.2f} GB + write {export.floors[0].bytes_written / GB:.2f} GB + fsync)",
                    f"{export.ratio(hash_cache):.2f}×",
                    f"≤ {TARGET_RATIO}×: {_verdict(export.ratio(hash_cache))}",
                )
            )
        if first.hash_s is not None and first.merge_only_s is not None:
            rows.append(
                (
                    f"{size}: export parts (first run, timed apart)",
                    f"sha256 of the sources {_ms(first.hash_s)}",
                    f"merge loop without writing {_ms(first.merge_only_s)}",
                    "",
                    "informational",
                )
            )
        rows.append(
            (
                f"{size}: export peak RssAnon",
                f"{export.anon_peak_bytes / GIB:.2f} GiB",
                f"baseline {first.anon_baseline_bytes / GIB:.2f} GiB after imports",
                f"+{(export.anon_peak_bytes - first.anon_baseline_bytes) / GIB:.2f} GiB",
                f"< 2 GiB: {'met' if export.anon_peak_bytes < TARGET_PEAK_BYTES else 'missed'}",
            )
        )
    return rows


def print_table(rows: list[tuple[str, ...]], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text where rich is missing
        print(title)
        for row in rows:
            print(" | ".join(row))
        return
    table = Table(title=title)
    for column in ("what", "measured (median)", "floor", "ratio", "target / notes"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console(width=200).print(table)


# -- main ------------------------------------------------------------------------------------------


@contextmanager
def work_folder(workdir: Path | None) -> Iterator[Path]:
    """``workdir`` (kept, sources reused) or a temporary folder in /tmp (deleted)."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix="merge-speed-") as folder:
        yield Path(folder)


def run(settings: Settings) -> dict[str, Any]:
    """Every size: sources, live re-merge, export; a table each; the results as plain data."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    results: dict[str, Any] = {
        "machine": machine_info(settings.device),
        "settings": {**asdict(settings), "engine_options": repr(settings.engine_options())},
        "sizes": {},
    }
    with work_folder(settings.workdir) as folder:
        for size in settings.sizes:
            print(f"[{size} {settings.family}] sources")
            sources = make_sources(size, settings.family, folder, device=settings.device)
            loads = {"before_live": load_average()}
            print(f"[{size} {settings.family}] live re-merge")
            live = measure_live(sources, settings, size=size)
            loads["before_export"] = load_average()
            export = None
            if settings.export_pairs > 0:
                print(f"[{size} {settings.family}] export")
                export = measure_export(sources, folder, settings)
            loads["after_export"] = load_average()
            source_bytes = {k: p.stat().st_size for k, p in sources.items()}
            results["sizes"][size] = {
                "source_bytes": source_bytes,
                "load_average": loads,
                "live": live,
                "export": export,
            }
            print_table(
                table_rows(f"{size} {settings.family}", live, export),
                f"Merge speed: {size} {settings.family}",
            )
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--family", default="sd1", choices=["sd1", "sdxl"])
    parser.add_argument("--dtype", default="fp16", choices=list(DTYPES), help="live (output buffer) dtype")
    parser.add_argument("--source-dtype", default="fp16", choices=list(DTYPES), help="resident source dtype")
    parser.add_argument("--reps", type=int, default=5, help="weighted sum and copy floor repetitions")
    parser.add_argument("--slow-reps", type=int, default=3, help="add_difference repetitions")
    parser.add_argument("--ties-reps", type=int, default=1, help="TIES repetitions at real size (0: skip)")
    parser.add_argument(
        "--export-pairs", type=int, default=2, help="floor/export pairs (ABBA order; 0 skips the export)"
    )
    parser.add_argument("--sizes", default="tiny,real", help="comma list of tiny, real")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny only, 2 repetitions (1 for add_difference, TIES), 1 export pair, 1 thread",
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--workdir", type=Path, help="keep (and reuse) the generated sources here")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results")
    parser.add_argument("--export-child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    quick = args.quick
    sizes = ("tiny",) if quick else tuple(s.strip() for s in args.sizes.split(",") if s.strip())
    unknown = set(sizes) - {"tiny", "real"}
    if unknown:
        raise SystemExit(f"--sizes takes tiny and/or real, got {', '.join(sorted(unknown))}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device is available to torch {torch.__version__}")
    return Settings(
        device=args.device,
        family=args.family,
        dtype=args.dtype,
        source_dtype=args.source_dtype,
        reps=2 if quick else args.reps,
        slow_reps=1 if quick else args.slow_reps,
        ties_reps=1 if quick else args.ties_reps,
        export_pairs=1 if quick else args.export_pairs,
        sizes=sizes,
        workdir=args.workdir,
        threads=args.threads if args.threads or not quick else 1,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.export_child is not None:
        print(json.dumps(asdict(export_child(json.loads(args.export_child)))))
        return
    settings = settings_from(args)
    started = time.perf_counter()
    results = run(settings)
    results["wall_s"] = time.perf_counter() - started
    write_json(args.json, results)
    print(f"wrote {args.json} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
