"""merge_speed's settings, sources (tiny, or real-size from ``_sources``) and plans, and the live
re-merge: ``LiveEngine.apply`` of every block (weighted sum, interleaved with the copy floor), of one
block alone (IN04 and the largest, against their byte share), and of the 3-source methods
add_difference and TIES (against the floor scaled to 3 reads + 1 write). TIES twice: density and α
changed in every block at every step (a study's trial), and α alone in some blocks (its merged delta
reused), each against a copy floor run between its steps."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from _common import GIB, Timing, device_peak, release, reset_device_peak, rss_anon_bytes, seconds, sync, timed
from _sources import CopyFloor, real_sources

from automerge.dtypes import TORCH_DTYPES
from automerge.merge import BlockParams, EngineOptions, LiveEngine, MergePlan, open_plan, resolve_params
from automerge.tiny import write_tiny

SOURCE = "merge_speed"  # names the plans in error messages
REAL_SEEDS = {"a": 0, "b": 1, "c": 2}  # real-size sources (export_overlap reuses them)


@dataclass(frozen=True)
class Settings:
    """What merge_speed runs: device, family, live dtypes, repetitions."""

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
    ties_alpha_blocks: tuple[str, ...] | None = None  # TIES α-only steps change these (None: all)

    @property
    def live_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def engine_options(self) -> EngineOptions:
        return EngineOptions(
            device=self.device, dtype=self.live_dtype, source_dtype=TORCH_DTYPES[self.source_dtype]
        )


def make_sources(size: str, family: str, folder: Path, *, device: str) -> dict[str, Path]:
    """Sources a, b, c: tiny (b, c perturbed copies of a) or real-size random (reused when present)."""
    if size == "real":
        return real_sources(family, folder, REAL_SEEDS, device=device)
    paths = {letter: folder / f"{size}-{family}-{letter}.safetensors" for letter in "abc"}
    write_tiny(family, paths["a"], seed=0)
    write_tiny(family, paths["b"], seed=1, like=paths["a"])
    write_tiny(family, paths["c"], seed=2, like=paths["a"])
    return paths


def make_plan(sources: Mapping[str, Path], method: str, params: Mapping[str, Any]) -> MergePlan:
    """Weighted sum of a, b; the other methods over a, b, c."""
    letters = "abc" if method != "weighted_sum" else "ab"
    return open_plan({k: sources[k] for k in letters}, method, params=dict(params), source=SOURCE)


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
    notes: str = ""  # shown in the table instead of "informational"

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
    reset_device_peak(settings.device)
    started = time.perf_counter()
    engine = LiveEngine(plan, settings.engine_options())
    sync(settings.device)
    return engine, time.perf_counter() - started


def measure_weighted_sum(sources: Mapping[str, Path], settings: Settings) -> LiveResult:
    """All-block and one-block weighted-sum re-merges, interleaved with the copy floor."""
    plan = make_plan(sources, "weighted_sum", {})
    engine, construct_s = _build(plan, settings)
    anon = rss_anon_bytes()
    block_bytes = engine.block_bytes()
    total_bytes = sum(block_bytes.values())
    numel = total_bytes // settings.live_dtype.itemsize
    floor = CopyFloor.allocate(numel, dtype=settings.live_dtype, device=settings.device)
    device = settings.device
    # warm-up: every block, first touch of the output buffers
    first_apply_s, merged = timed(lambda: engine.apply(step_params(plan, 0)), device=device)
    assert merged == set(block_bytes), f"warm-up merged {sorted(merged)}, not every block"
    seconds(lambda: floor.add(numel), device=device)
    merge_runs, floor_runs = [], []
    for step in range(1, settings.reps + 1):
        floor_runs.append(seconds(lambda: floor.add(numel), device=device))
        params = step_params(plan, step)
        merge_runs.append(seconds(partial(engine.apply, params), device=device))
    all_blocks = Timing.of(merge_runs)
    result = MethodResult(
        "weighted_sum", len(block_bytes), total_bytes, 3, all_blocks, statistics.median(floor_runs),
        construct_s, first_apply_s, device_peak(device),
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
    floor: CopyFloor,
    block: str,
    block_bytes: Mapping[str, int],
    all_blocks: Timing,
    settings: Settings,
) -> BlockResult:
    """Re-merge ``block`` alone ``reps`` times (only its α changes) and its share of the copy floor."""
    device = settings.device
    numel = block_bytes[block] // settings.live_dtype.itemsize
    engine.apply(step_params(plan, 0, only=block))  # back to step 0 everywhere
    merge_runs, floor_runs = [], []
    for step in range(1, settings.reps + 1):
        params = step_params(plan, step, only=block)
        floor_runs.append(seconds(lambda: floor.add(numel), device=device))
        elapsed, merged = timed(partial(engine.apply, params), device=device)
        merge_runs.append(elapsed)
        assert merged == {block}, f"step {step} re-merged {sorted(merged)}, not only {block}"
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
    first_apply_s = seconds(partial(engine.apply, step_params(plan, 0)), device=settings.device)  # warm-up
    runs = []
    for step in range(1, reps + 1):
        params = step_params(plan, step)
        runs.append(seconds(partial(engine.apply, params), device=settings.device))
    result = MethodResult(
        method, len(engine.block_bytes()), total_bytes, 4, Timing.of(runs),
        floor_seconds_per_byte * 4 * total_bytes, construct_s, first_apply_s, device_peak(settings.device),
    )  # fmt: skip
    plan.close()
    return result


TIES_FLOOR_NUMEL = 1 << 27  # elements of TIES's interleaved copy floor (its time scaled per byte)


def ties_params(plan: MergePlan, step: int, *, alpha_only: tuple[str, ...] | None = None) -> BlockParams:
    """α and density per block (VAE named, so every block merges). ``alpha_only`` None: both change in
    every block at every step (a study's trial: α 0.3 + 0.01·step + 0.001·i, density 0.3 +
    0.07·(step mod 6) + 0.001·i); else density stays at step 0's and only those blocks' α changes."""
    alphas, densities = {}, {}
    for index, block in enumerate(plan.arch.blocks):
        alpha_step = step if alpha_only is None or block in alpha_only else 0
        density_step = step if alpha_only is None else 0
        alphas[block] = round(0.3 + 0.01 * alpha_step + 0.001 * index, 6)
        densities[block] = round(0.3 + 0.07 * (density_step % 6) + 0.001 * index, 6)
    values = {"alpha": alphas, "density": densities}
    return resolve_params(plan.method, values, blocks=plan.arch.blocks, source=SOURCE)


def measure_ties(sources: Mapping[str, Path], *, reps: int, settings: Settings) -> list[MethodResult]:
    """TIES re-merges: of every block with density and α changed at each step, then of the
    ``settings.ties_alpha_blocks`` with α alone changed (the first such apply, which also keeps the
    merged deltas, reported as its first apply). Both against a copy floor run before each step, per
    byte, scaled to 3 reads + 1 write of the re-merged bytes."""
    device, itemsize = settings.device, settings.live_dtype.itemsize
    plan = make_plan(sources, "ties", {})
    engine, construct_s = _build(plan, settings)
    block_bytes = engine.block_bytes()
    floor_numel = min(sum(block_bytes.values()) // itemsize, TIES_FLOOR_NUMEL)
    floor = CopyFloor.allocate(floor_numel, dtype=settings.live_dtype, device=device)
    first_apply_s = seconds(partial(engine.apply, ties_params(plan, 0)), device=device)  # builds the ranks
    floor_runs: list[float] = []

    def runs(steps: range, alpha_only: tuple[str, ...] | None) -> list[float]:
        out = []
        for step in steps:
            floor_runs.append(seconds(partial(floor.add, floor_numel), device=device))
            out.append(
                seconds(partial(engine.apply, ties_params(plan, step, alpha_only=alpha_only)), device=device)
            )
        return out

    both = runs(range(1, reps + 1), None)
    held = engine._task.held_bytes() if engine._task is not None else 0
    passes: list[float] = []
    if engine._task is not None and engine._task.fused is not None:  # the same steps in torch's passes
        kernel, engine._task.fused = engine._task.fused, None
        passes = runs(range(1, reps + 1), None)
        engine._task.fused = kernel
    alpha_blocks = settings.ties_alpha_blocks or tuple(block_bytes)
    engine.apply(ties_params(plan, 0))  # density back to step 0's: the next steps change α alone
    keep_s = runs(range(1, 2), alpha_blocks)[0]  # merges, and keeps the merged deltas
    alpha = runs(range(2, reps + 2), alpha_blocks)
    held_alpha = engine._task.held_bytes() if engine._task is not None else 0
    per_byte = statistics.median(floor_runs) / (3 * floor_numel * itemsize)
    peak = device_peak(device)
    alpha_bytes = sum(block_bytes[name] for name in alpha_blocks)
    label = "all blocks" if settings.ties_alpha_blocks is None else ", ".join(alpha_blocks)
    results = [
        MethodResult(
            "ties (density and α changed)", len(block_bytes), sum(block_bytes.values()), 4, Timing.of(both),
            per_byte * 4 * sum(block_bytes.values()), construct_s, first_apply_s, peak,
            f"ranks etc. held: {held / GIB:.2f} GiB; first apply (ranks built) {ms(first_apply_s)}",
        ),
        MethodResult(
            f"ties (α only: {label})", len(alpha_blocks), alpha_bytes, 4, Timing.of(alpha), per_byte * 4 * alpha_bytes,
            construct_s, keep_s, peak,
            f"first α-only apply (merges, keeps merged Δ) {ms(keep_s)}; held {held_alpha / GIB:.2f} GiB",
        ),
    ]  # fmt: skip
    if passes:
        results.insert(1, MethodResult(
            "ties (density and α changed), torch passes instead of the fused CPU kernel", len(block_bytes),
            sum(block_bytes.values()), 4, Timing.of(passes), per_byte * 4 * sum(block_bytes.values()),
            construct_s, first_apply_s, peak,
            f"the same steps, side by side: fused {ms(statistics.median(both))} vs passes {ms(statistics.median(passes))}",
        ))  # fmt: skip
    plan.close()
    return results


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def measure_live(sources: Mapping[str, Path], settings: Settings, *, size: str) -> LiveResult:
    """Weighted sum (with its floor and single blocks), then add_difference and TIES, one engine each."""
    live = measure_weighted_sum(sources, settings)
    release(settings.device)
    per_byte = live.floor.median_s / live.floor_bytes_moved
    print(
        f"  weighted_sum all blocks: {ms(live.weighted_sum.merge.median_s)}, floor {ms(live.floor.median_s)}"
    )
    if settings.slow_reps > 0:
        result = measure_method(
            sources,
            "add_difference",
            reps=settings.slow_reps,
            floor_seconds_per_byte=per_byte,
            settings=settings,
        )
        release(settings.device)
        live.others.append(result)
        print(f"  add_difference all blocks: {ms(result.merge.median_s)}")
    ties_reps = settings.ties_reps if size == "real" else settings.slow_reps
    if ties_reps > 0:
        for result in measure_ties(sources, reps=ties_reps, settings=settings):
            live.others.append(result)
            print(f"  {result.method}: {ms(result.merge.median_s)} ({result.ratio:.2f}× its floor)")
        release(settings.device)
    return live
