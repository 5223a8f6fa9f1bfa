"""``automerge optimize --dry-run``: everything a study would use, checked and sized from headers alone,
before a GPU is committed for a night.

The memory plan follows ``LiveEngine``: every merged key of every distinct source file is held at the
source storage dtype (on the device, or in host memory with ``render.offload``), plus the live
weights at the render dtype on the device; reward models are counted by the size of their weight
files. Activations are not estimated: the plan must leave ``HEADROOM`` of the free memory for them.
The time per trial comes from ``--calibrate`` (one trial rendered for real) or from the study's own
completed trials in its storage; otherwise it is left unknown rather than guessed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from automerge.dtypes import dtype_name
from automerge.merge import MergePlan
from automerge.merge.engine import held_sources, live_keys, task_statistics_bytes
from automerge.render.config import RenderConfig
from automerge.rewards import CompositeManifest, find_manifest, read_manifest
from automerge.study import records
from automerge.study.config import InlineReward, StudyFile
from automerge.study.runtime import StudyRuntime, generate_models, open_study_plan, study_jobs
from automerge.study.space import Dimension, build_space

HEADROOM = 0.15
"""Share of the free memory left for activations, the VAE decode and the allocator's slack."""
GIB = 1024**3


@dataclass(frozen=True)
class MemoryItem:
    """One resident thing: what it is, its bytes, and where it lives (``device`` or ``host``)."""

    name: str
    bytes: int
    where: str


@dataclass
class DryRun:
    """What ``--dry-run`` found and printed."""

    family: str
    method: str
    dimensions: list[str]
    blocks: list[str]
    images_per_trial: int
    trials: int
    device: str
    memory: list[MemoryItem]
    free_device_bytes: int | None
    free_host_bytes: int | None
    seconds_per_trial: float | None = None
    timing_source: str = ""
    problems: list[str] = field(default_factory=list)

    def total(self, where: str) -> int:
        return sum(item.bytes for item in self.memory if item.where == where)

    @property
    def fits(self) -> bool:
        return not self.problems


def dry_run(study: StudyFile, *, device: str | None = None, calibrate: bool = False) -> DryRun:
    """Check and size ``study`` from the model headers (nothing loaded unless ``calibrate``)."""
    config = study.render if device is None else study.render.model_copy(update={"device": device})
    torch_device = config.torch_device(where=f"{study.path}: render.device")
    generate_models(study)
    plan = open_study_plan(study)
    try:
        space = build_space(study, plan.arch, plan.method, model_names=plan.model_names)
        jobs = study_jobs(study.payloads)
        memory = _engine_memory(plan, torch_device, config, live_loras=space.live_loras)
        memory += _task_memory(plan, config, alpha_only=_alpha_only_blocks(space.dimensions))
        memory += _reward_memory(study, torch_device)
        result = DryRun(
            family=plan.arch.name,
            method=plan.method.name,
            dimensions=[d.name for d in space.dimensions],
            blocks=list(plan.params.blocks),
            images_per_trial=len(jobs),
            trials=study.trials,
            device=str(torch_device),
            memory=memory,
            free_device_bytes=free_bytes(torch_device),
            free_host_bytes=free_bytes(torch.device("cpu")),
        )
    finally:
        plan.close()
    result.problems = _problems(result, config, torch_device)
    if calibrate and result.fits:
        result.seconds_per_trial, result.timing_source = _calibrate(study, device), "one calibration trial"
    elif (measured := _stored_seconds_per_trial(study)) is not None:
        result.seconds_per_trial, result.timing_source = measured
    return result


def _engine_memory(
    plan: MergePlan, device: torch.device, config: RenderConfig, *, live_loras: frozenset[str] = frozenset()
) -> list[MemoryItem]:
    """Sources and live weights as ``LiveEngine`` holds them (a file given twice is held once), and
    for a source with a searched LoRA strength, its own tensors of the keys its LoRAs adapt."""
    dtype = config.torch_dtype(device)
    storage = config.storage_dtype(device)
    numel = sum(info.numel for _block, _key, info in live_keys(plan))
    held = sorted(set(held_sources(plan).values()))
    where = "host" if config.offload else "device"
    items = [
        MemoryItem(
            f"source {name} ({plan.sources[name].path.name}, {dtype_name(storage)})",
            numel * storage.itemsize,
            where,
        )
        for name in held
    ]
    items.append(MemoryItem(f"live merged weights ({dtype_name(dtype)})", numel * dtype.itemsize, "device"))
    for name, entries in plan.loras.items():
        if not any(lora_name in live_loras for lora_name, _ in entries):
            continue
        adapted = {key for _, lora in entries for key in lora.layers}
        kept = sum(info.nbytes for _block, key, info in live_keys(plan) if key in adapted)
        items.append(MemoryItem(f"source {name}'s tensors under its searched LoRAs", kept, where))
    return items


def _task_memory(plan: MergePlan, config: RenderConfig, *, alpha_only: frozenset[str]) -> list[MemoryItem]:
    """ties / dare / dare_ties / della: the per-element ranks and draws ``LiveEngine`` keeps beside
    the sources for fast exact re-merges, and the merged deltas of the blocks whose α alone is searched."""
    ranks, merged = task_statistics_bytes(plan, alpha_only_blocks=alpha_only)
    where = "host" if config.offload else "device"
    items = []
    if ranks:
        items.append(
            MemoryItem(f"{plan.method.name} ranks / draws per element (live re-merge)", ranks, where)
        )
    if merged:
        items.append(MemoryItem("merged deltas of the blocks whose α alone is searched", merged, where))
    return items


def _alpha_only_blocks(dimensions: Sequence[Dimension]) -> frozenset[str]:
    """Blocks whose α is searched and no other method parameter (their merged delta is reused)."""
    alpha = {block for d in dimensions if d.param == "alpha" for block in d.blocks}
    other = {block for d in dimensions if d.param != "alpha" and d.lora is None for block in d.blocks}
    return frozenset(alpha - other)


def _reward_memory(study: StudyFile, device: torch.device) -> list[MemoryItem]:
    """Reward models (every objective's) by the size of their weight files (as stored); a reference
    reward holds images."""
    return [item for scoring in study.scorings for item in _manifest_memory(scoring.reward, device)]


def _manifest_memory(reward: Path | InlineReward, device: torch.device) -> list[MemoryItem]:
    if isinstance(reward, InlineReward):
        return []
    manifest_path = find_manifest(reward)
    manifest = read_manifest(manifest_path)
    members = (
        [find_manifest(m.manifest, near=manifest_path.parent) for m in manifest.members]
        if isinstance(manifest, CompositeManifest)
        else [manifest_path]
    )
    items = []
    for path in members:
        member = read_manifest(path)
        assert not isinstance(member, CompositeManifest)
        size = sum(_size_on_disk(weights) for weights in member.weights.values())
        where = "device" if torch.device(member.device).type == device.type else "host"
        label = (
            f"reward {path.stem} (weight files)"
            if size
            else f"reward {path.stem} (weights not fetched: size unknown)"
        )
        items.append(MemoryItem(label, size, where))
    return items


def _size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    return 0


_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}


def free_bytes(device: torch.device) -> int | None:
    """Free memory of ``device``: the GPU's (``torch.cuda.mem_get_info``), else the host's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _problems(result: DryRun, config: RenderConfig, device: torch.device) -> list[str]:
    """What does not fit, each with the setting to change."""
    problems = []
    on_device = result.total("device") + (result.total("host") if device.type == "cpu" else 0)
    free = result.free_device_bytes
    if free is not None and on_device > (1 - HEADROOM) * free:
        fixes = []
        if not config.offload and device.type == "cuda":
            fixes.append("render.offload: true (sources in host memory, streamed block by block)")
        if config.source_dtype == "same" and config.torch_dtype(device) == torch.float32:
            fixes.append("render.source_dtype: fp16 (halves the sources)")
        fix = "; or ".join(fixes) or "render.device: a device with more free memory (or merge fewer models)"
        problems.append(
            f"the plan needs {on_device / GIB:.1f} GiB on {device} but {free / GIB:.1f} GiB is free "
            f"({HEADROOM:.0%} is kept for activations); set {fix}"
        )
    host_free = result.free_host_bytes
    if device.type == "cuda" and host_free is not None and result.total("host") > (1 - HEADROOM) * host_free:
        problems.append(
            f"the plan needs {result.total('host') / GIB:.1f} GiB of host memory but {host_free / GIB:.1f} GiB "
            "is available; set render.source_dtype: fp16, or turn render.offload off if the GPU has room"
        )
    return problems


def _calibrate(study: StudyFile, device: str | None) -> float:
    """Seconds of one trial (merge, render, score) at the uniform midpoint, after one warm-up trial."""
    runtime = StudyRuntime(study, device=device)
    try:
        warm_up, timed = (
            runtime.space.block_params(
                {d.name: d.low + share * (d.high - d.low) for d in runtime.space.dimensions}
            )
            for share in (0.5, 0.25)
        )
        runtime.evaluate(warm_up, runtime.jobs)  # first-call allocations, kernels, caches
        started = time.perf_counter()
        runtime.evaluate(timed, runtime.jobs)  # every block re-merged, rendered, scored
        return time.perf_counter() - started
    finally:
        runtime.close()


def _stored_seconds_per_trial(study: StudyFile) -> tuple[float, str] | None:
    """The median of merge + render + score over the study's completed trials, if it has run before."""
    from automerge.study.storage import find_study

    stored = find_study(study)
    if stored is None:
        return None
    totals = [
        sum(record.timings.get(stage, 0.0) for stage in ("merge", "render", "score"))
        for record in records.records(stored)
        if record.timings
    ]
    if not totals:
        return None
    return statistics.median(totals), f"median of {len(totals)} trials already in the study's storage"
