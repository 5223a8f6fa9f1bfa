"""gpu_study's measurements of one phase: the study's per-stage timings (read back from its Optuna
storage), then with a fresh ``StudyRuntime`` of the same study the live re-merge against the copy floor
(and, offloaded, the host→device floor), render images/s batched vs one by one and scorer images/s;
VRAM and host-memory peaks per step. A failing step is recorded, not raised."""

from __future__ import annotations

import statistics
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from _common import GIB, HostMemorySampler, event_timed, seconds
from _gpu_phases import Phase, Settings
from _sources import CopyFloor

from automerge.render import RenderedImage, Renderer
from automerge.study import StudyFile, StudyRuntime, TrialRecord, default_storage, run_study
from automerge.study.records import STAGES


@dataclass
class MemoryPeak:
    """Peaks over one stage: VRAM allocated / reserved by torch's allocator, host RSS and RssAnon."""

    vram_allocated_bytes: int | None = None
    vram_reserved_bytes: int | None = None
    rss_bytes: int = 0
    rss_anon_bytes: int = 0


@contextmanager
def watch_memory(device: torch.device) -> Iterator[MemoryPeak]:
    """Reset the device's peak statistics, sample host memory every 10 ms; the peaks land in the
    yielded object."""
    peak = MemoryPeak()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    sampler = HostMemorySampler(interval_s=0.01)
    try:
        with sampler:
            yield peak
    finally:
        peak.rss_bytes, peak.rss_anon_bytes = sampler.rss_bytes, sampler.anon_bytes
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak.vram_allocated_bytes = int(torch.cuda.max_memory_allocated())
            peak.vram_reserved_bytes = int(torch.cuda.max_memory_reserved())


@contextmanager
def vram_cap(gib: float | None, *, device: torch.device) -> Iterator[None]:
    """Cap this process's allocator at ``gib`` GiB (an allocation past it raises OutOfMemoryError)."""
    if gib is None or device.type != "cuda":
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


# -- the study -------------------------------------------------------------------------------------


@dataclass
class StageStat:
    median_s: float
    share: float  # of the sum of every stage's median (the median trial)
    runs_s: list[float]


@dataclass
class StudyResult:
    wall_s: float
    startup_s: float  # wall minus every trial's stages: sources, pipeline, reward, storage
    completed: int
    failed: int
    fail_reasons: list[str]
    stages: dict[str, StageStat]
    trial_median_s: float | None
    first_trial_s: float | None
    memory: MemoryPeak


def study_stages(study_file: StudyFile) -> tuple[dict[str, StageStat], list[float], int, list[str]]:
    """Per stage: median seconds over completed trials and share; per-trial totals; failures."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=study_file.name, storage=default_storage(study_file))
    trials = [TrialRecord.of(t) for t in study.trials]
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.timings]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    runs = {stage: [t.timings.get(stage, 0.0) for t in done] for stage in STAGES}
    medians = {stage: statistics.median(v) for stage, v in runs.items() if v}
    total = sum(medians.values()) or 1.0
    stages = {s: StageStat(m, m / total, runs[s]) for s, m in medians.items()}
    totals = [sum(t.timings.values()) for t in done]
    reasons = [str(t.fail_reason or "?")[:300] for t in failed]
    return stages, totals, len(failed), reasons


def run_phase_study(phase: Phase, settings: Settings, study_file: StudyFile) -> StudyResult:
    from rich.console import Console

    device = torch.device(settings.device)
    with watch_memory(device) as memory:
        started = time.perf_counter()
        run_study(study_file, device=settings.device, export=False, console=Console(width=160))
        wall = time.perf_counter() - started
    stages, totals, failed, reasons = study_stages(study_file)
    return StudyResult(
        wall_s=wall,
        startup_s=wall - sum(totals),
        completed=len(totals),
        failed=failed,
        fail_reasons=reasons,
        stages=stages,
        trial_median_s=statistics.median(totals) if totals else None,
        first_trial_s=totals[0] if totals else None,
        memory=memory,
    )


# -- micro-benchmarks on a fresh runtime -----------------------------------------------------------


@dataclass
class RemergeResult:
    blocks: int
    bytes_out: int  # of the re-merged blocks' live buffers
    merge_s: list[float]
    floor_s: list[float]  # torch.add over the same element counts, on the device
    h2d_s: list[float] | None  # offload: both sources' block bytes from pinned host memory
    memory: MemoryPeak

    @property
    def merge_median_s(self) -> float:
        return statistics.median(self.merge_s)

    @property
    def floor_median_s(self) -> float:
        return statistics.median(self.floor_s)

    @property
    def ratio(self) -> float:
        return self.merge_median_s / self.floor_median_s

    @property
    def offload_floor_s(self) -> float | None:
        return None if self.h2d_s is None else statistics.median(self.h2d_s) + self.floor_median_s

    @property
    def offload_ratio(self) -> float | None:
        floor = self.offload_floor_s
        return None if floor is None else self.merge_median_s / floor


def _alpha_values(runtime: StudyRuntime, step: int) -> dict[str, float]:
    """A different α for every dimension at every step: 0.3 + 0.01·step + 0.001·i."""
    return {d.name: round(0.3 + 0.01 * step + 0.001 * i, 6) for i, d in enumerate(runtime.space.dimensions)}


def measure_remerge(runtime: StudyRuntime, settings: Settings) -> RemergeResult:
    """All searched blocks re-merged ``reps`` times (α changed each time), interleaved with the floors."""
    session, device = runtime.session, runtime.device
    options = session.engine.options
    step_params = [
        runtime.space.block_params(_alpha_values(runtime, step)) for step in range(settings.reps + 2)
    ]
    with watch_memory(device) as memory:
        session.apply(step_params[0])  # warm-up: every block, VAE copied
        merged = session.apply(step_params[1])
        numels = [session.engine.block_bytes()[name] // options.dtype.itemsize for name in sorted(merged)]
        floor = CopyFloor.allocate(max(numels), dtype=options.dtype, device=device)

        def add_floor() -> None:
            for n in numels:
                floor.add(n)

        offload = options.offload and device.type == "cuda"
        if offload:
            source_dtype = options.source_dtype or options.dtype
            host = torch.empty(max(numels), dtype=source_dtype, pin_memory=True).copy_(floor.a.cpu())
            staged = torch.empty(max(numels), dtype=source_dtype, device=device)

        def h2d() -> None:
            for n in numels:
                for _ in runtime.plan.sources:
                    staged[:n].copy_(host[:n], non_blocking=True)

        add_floor()
        merge_s, floor_s, h2d_s = [], [], []
        for params in step_params[2:]:
            floor_s.append(seconds(add_floor, device=device, events=True))
            merge_s.append(seconds(partial(session.apply, params), device=device, events=True))
            if offload:
                h2d_s.append(seconds(h2d, device=device, events=True))
    bytes_out = sum(numels) * options.dtype.itemsize
    return RemergeResult(len(numels), bytes_out, merge_s, floor_s, h2d_s if offload else None, memory)


@dataclass
class RenderResult:
    images: int
    batch_size: int
    batched_s: list[float]
    single_s: list[float]
    max_pixel_difference: int  # batched vs one by one, 8-bit
    memory: MemoryPeak

    @property
    def batched_images_per_s(self) -> float:
        return self.images / statistics.median(self.batched_s)

    @property
    def single_images_per_s(self) -> float:
        return self.images / statistics.median(self.single_s)

    @property
    def speedup(self) -> float:
        return self.batched_images_per_s / self.single_images_per_s


def measure_render(runtime: StudyRuntime, settings: Settings) -> tuple[RenderResult, list[RenderedImage]]:
    """The study's jobs rendered by its renderer (batch ``--batch-size``) and one by one, alternately."""
    import numpy as np

    device = runtime.device
    jobs = [job.job for job in runtime.jobs]
    batched = runtime.session.renderer
    single = Renderer(batched.pipeline, batch_size=1, device=device, dtype=runtime.session.dtype)
    render_reps = max(1, settings.reps // 3)
    with watch_memory(device) as memory:
        single.render(jobs[:1])  # warm-up of the batch-1 shapes (the study warmed the batched ones)
        batched_s, single_s = [], []
        for _ in range(render_reps):
            elapsed, together = event_timed(lambda: batched.render(jobs), device=device)
            batched_s.append(elapsed)
            elapsed, alone = event_timed(lambda: single.render(jobs), device=device)
            single_s.append(elapsed)
    difference = max(
        int(np.abs(np.asarray(x.image, dtype=np.int16) - np.asarray(y.image, dtype=np.int16)).max())
        for x, y in zip(together, alone, strict=True)
    )
    result = RenderResult(len(jobs), batched.batch_size, batched_s, single_s, difference, memory)
    return result, together


@dataclass
class ScoreTiming:
    images: int
    score_s: list[float]
    memory: MemoryPeak

    @property
    def images_per_s(self) -> float:
        return self.images / statistics.median(self.score_s)


def measure_score(runtime: StudyRuntime, images: Sequence[RenderedImage], settings: Settings) -> ScoreTiming:
    """The study's reward (composite) on the rendered images: warm-up, then ``reps`` timed calls."""
    device = runtime.device
    pil = [r.image for r in images]
    prompts = [r.job.prompt for r in images]
    keys = [r.job.key for r in images]
    with watch_memory(device) as memory:
        runtime.reward.score(pil, prompts, keys=keys)
        runs = [
            seconds(lambda: runtime.reward.score(pil, prompts, keys=keys), device=device, events=True)
            for _ in range(settings.reps)
        ]
    return ScoreTiming(len(pil), runs, memory)


# -- a phase's results -----------------------------------------------------------------------------


@dataclass
class PhaseResult:
    phase: Phase
    vram_cap_gib: float | None
    sources_bytes: dict[str, int] = field(default_factory=dict)
    study: StudyResult | None = None
    construct_s: float | None = None
    construct_memory: MemoryPeak | None = None
    remerge: RemergeResult | None = None
    render: RenderResult | None = None
    score: ScoreTiming | None = None
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0


@contextmanager
def recorded(result: PhaseResult, what: str) -> Iterator[None]:
    """Run a step; an exception is recorded (and printed) instead of ending the benchmark."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - a benchmark keeps going: the other steps and phases still report
        traceback.print_exc()
        result.errors.append(f"{what}: {type(error).__name__}: {str(error)[:500]}")


def measure_runtime(result: PhaseResult, study_file: StudyFile, settings: Settings) -> None:
    """A fresh runtime of the study (its build timed), then re-merge, render and score into ``result``."""
    device = torch.device(settings.device)
    with watch_memory(device) as memory:
        started = time.perf_counter()
        runtime = StudyRuntime(study_file, device=settings.device)
        result.construct_s = time.perf_counter() - started
    result.construct_memory = memory
    try:
        result.remerge = measure_remerge(runtime, settings)
        result.render, images = measure_render(runtime, settings)
        result.score = measure_score(runtime, images, settings)
    finally:
        runtime.close()
