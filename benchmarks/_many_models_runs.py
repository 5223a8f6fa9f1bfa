"""many_models' measurements, each in a fresh interpreter (``many_models.py --child``) so that its
memory is its own: the N-source export under the RssAnon sampler, the read floor, and the resume
check (an export killed half-way, finished by a second run, compared byte for byte).

The read floor is every tensor of every source read once through automerge's reader (a view of the
file's memory map: the fastest read there is, ~20× cheaper per tensor than ``safe_open``'s
``get_tensor``), key by key in the export's order (A's sorted keys; per key the models, then the
base), each copied into one reused buffer: a bare view reads nothing; then the same bytes again in 16 MiB
slices of each file (no per-tensor cost at all). The floor is the faster of the two.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from _common import ROOT, HostMemorySampler, rss_anon_bytes

from automerge.checkpoints import CACHE_DIR_VARIABLE, open_safetensors
from automerge.cli import PROCESS_DEFAULTS
from automerge.merge import export_merge
from automerge.merge.plan import open_plan

SCRIPT = Path(__file__).resolve().parent / "many_models.py"  # runs ``child`` with --child
SAMPLE_S = 0.01  # RssAnon sampling interval


@dataclass(frozen=True)
class Job:
    """One child's work: export ``method`` of ``models`` to ``out``, or read them (the floor)."""

    models: dict[str, str]  # name → path, a first, c the base
    order: list[str]  # read order of the floor: the models, then the base
    method: str = ""
    params: dict[str, float] | None = None
    seed: int = 0
    out: str = ""
    threads: int | None = None
    keep: bool = False  # keep the output (the resume check compares it)
    cold: bool = False  # evict the sources from the page cache before each timed read
    watched: bool = False  # print export_merge's progress after each key (the resume check counts it)


@dataclass(frozen=True)
class ExportRun:
    export_s: float
    bytes_written: int
    anon_imports_bytes: int  # RssAnon after imports
    anon_plan_bytes: int  # after open_plan (N headers parsed)
    anon_peak_bytes: int  # peak RssAnon sampled during export_merge
    rss_peak_bytes: int  # peak VmRSS sampled during export_merge (memory-mapped pages included)
    maxrss_bytes: int  # ru_maxrss of the child's whole life
    samples: int
    keys: int
    merged_keys: int
    found_keys: int | None = None  # when watched: keys a resumed export found already written
    computed_keys: int | None = None  # when watched: keys this run wrote
    notes: list[str] | None = None  # when watched: export_merge's notify lines ("resuming: …")


@dataclass(frozen=True)
class FloorRun:
    read_s: float  # key by key, as the export reads
    bytes_read: int
    tensors: int
    bulk_s: float = 0.0  # the same bytes in 16 MiB slices of each file's data (no per-key cost)

    @property
    def floor_s(self) -> float:
        """The cheaper of the two ways to read every byte once: the floor."""
        return min(self.read_s, self.bulk_s) if self.bulk_s else self.read_s


# -- in the child -----------------------------------------------------------------------------------


def child(job: Job) -> dict[str, Any]:
    """Run ``job`` in this (fresh) interpreter; the result as plain data."""
    if job.threads:
        torch.set_num_threads(job.threads)
    return asdict(export_child(job) if job.method else floor_child(job))


def floor_child(job: Job) -> FloorRun:
    """Every tensor of every source read once, key by key in the export's order."""
    with ExitStack() as stack:
        handles = [stack.enter_context(open_safetensors(job.models[name])) for name in job.order]
        keys = handles[0].keys()  # sorted
        scratch = torch.empty(0, dtype=torch.uint8)
        read = tensors = 0
        _evict_if_cold(job)
        started = time.perf_counter()
        for key in keys:
            for handle in handles:
                raw = handle.load(key).reshape(-1).view(torch.uint8)
                if raw.numel() > scratch.numel():
                    scratch = torch.empty(raw.numel(), dtype=torch.uint8)
                scratch[: raw.numel()].copy_(raw)
                read, tensors = read + raw.numel(), tensors + 1
        per_key_s = time.perf_counter() - started
    _evict_if_cold(job)
    return FloorRun(per_key_s, read, tensors, bulk_s=_bulk_read_s([job.models[name] for name in job.order]))


def _evict_if_cold(job: Job) -> None:
    """With ``job.cold``: drop the sources' pages from the page cache (clean pages go at once), so the
    next read comes from the disk."""
    if not job.cold:
        return
    for path in job.models.values():
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


BULK_SLICE = 16 << 20


def _bulk_read_s(paths: list[str]) -> float:
    """Seconds to copy each file's tensor bytes (after its header) through a memory map in 16 MiB
    slices into one reused buffer: reading the sources with no per-tensor cost at all."""
    import mmap
    import struct

    scratch = torch.empty(BULK_SLICE, dtype=torch.uint8)
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb") as file:
            start = 8 + struct.unpack("<Q", file.read(8))[0]
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        data = memoryview(mapped)[start:]
        for offset in range(0, len(data), BULK_SLICE):
            piece = data[offset : offset + BULK_SLICE]
            scratch[: len(piece)].copy_(torch.frombuffer(piece, dtype=torch.uint8))
            del piece
        del data
        mapped.close()
    return time.perf_counter() - started


def export_child(job: Job) -> ExportRun:
    """``export_merge`` of the job's plan under the RssAnon sampler (the plan opened before)."""
    gc.collect()
    anon_imports = rss_anon_bytes()
    plan = open_plan(
        {name: Path(path) for name, path in job.models.items()},
        job.method,
        params=job.params or {},
        seed=job.seed,
        source="many_models",
    )
    keys = [k for k in plan.primary.checkpoint.keys() if plan.arch.is_exported(k)]
    merged = sum(plan.merged_block(k, plan.primary.checkpoint.info(k).dtype) is not None for k in keys)
    watch = _Watch()
    options = {"progress": watch.progress, "notify": watch.notes.append} if job.watched else {}
    out = Path(job.out)
    gc.collect()
    anon_plan = rss_anon_bytes()
    _evict_if_cold(job)
    with HostMemorySampler(interval_s=SAMPLE_S) as sampler:
        started = time.perf_counter()
        export_merge(plan, out, **options)
        export_s = time.perf_counter() - started
    plan.close()
    written = out.stat().st_size
    if not job.keep:
        out.unlink()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return ExportRun(
        export_s, written, anon_imports, anon_plan, sampler.anon_bytes, sampler.rss_bytes, maxrss,
        sampler.samples, len(keys), merged,
        *((watch.found, watch.done - (watch.found or 0), watch.notes) if job.watched else ()),
    )  # fmt: skip


class _Watch:
    """export_merge's ``progress``: prints "key DONE TOTAL" after each key (the parent reads it and
    kills this process half-way) and keeps what a resumed export found already written."""

    def __init__(self) -> None:
        self.found: int | None = None
        self.done = 0
        self.notes: list[str] = []

    def progress(self, done_keys: int, total_keys: int, done_bytes: int, total_bytes: int) -> None:
        if self.found is None:  # the first call comes before the first key
            self.found = done_keys
        self.done = done_keys
        print(f"key {done_keys} {total_keys}", flush=True)


# -- in the parent ----------------------------------------------------------------------------------


def run_child(job: Job, *, cache_dir: Path) -> dict[str, Any]:
    """``child(job)`` in a fresh interpreter; its sha256 cache is ``cache_dir``."""
    completed = subprocess.run(
        _command(job), capture_output=True, text=True, check=False, cwd=ROOT, env=_env(cache_dir)
    )
    if completed.returncode != 0:
        raise RuntimeError(f"many_models child failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    return dict(json.loads(completed.stdout.strip().splitlines()[-1]))


def export_run(job: Job, *, cache_dir: Path) -> ExportRun:
    return ExportRun(**run_child(job, cache_dir=cache_dir))


def floor_run(job: Job, *, cache_dir: Path) -> FloorRun:
    return FloorRun(**run_child(job, cache_dir=cache_dir))


def _command(job: Job) -> list[str]:
    return [sys.executable, str(SCRIPT), "--child", json.dumps(asdict(job))]


def _env(cache_dir: Path) -> dict[str, str]:
    """The children's environment: the ``automerge`` command's defaults (so an export runs as
    ``automerge merge`` runs it), this process's own, and the hash cache."""
    return {**PROCESS_DEFAULTS, **os.environ, CACHE_DIR_VARIABLE: str(cache_dir)}


# -- the resume check -------------------------------------------------------------------------------


@dataclass
class ResumeCheck:
    """Counts are of every key written (merged and copied), as export_merge's progress counts them."""

    sources: int
    method: str
    available: bool
    note: str
    keys: int = 0
    reference_s: float = 0.0
    killed_after_keys: int = 0  # keys the first run had written when SIGKILLed
    journal_records_at_kill: int = 0  # tensors its journal recorded by then
    resumed_found_keys: int = 0  # keys the second run found written (and kept)
    resumed_keys: int = 0  # keys the second run wrote
    resumed_s: float = 0.0
    resumed_notes: list[str] | None = None  # export_merge's notify lines ("resuming: …")
    identical: bool | None = None
    sha256_reference: str = ""
    sha256_resumed: str = ""
    leftovers: list[str] | None = None  # files left beside the output after the resumed run

    @property
    def keys_redone(self) -> int:
        """Keys written by both runs (the work the kill cost): the killed run's journal, not its
        progress count, says what it wrote (writes in flight land after the last count reported)."""
        return max(self.killed_after_keys, self.journal_records_at_kill) + self.resumed_keys - self.keys


def resume_check(job: Job, folder: Path, *, cache_dir: Path) -> ResumeCheck:
    """An uninterrupted export of ``job`` against one SIGKILLed once about half its keys are written
    (and its ``.<name>.partial.journal`` exists), then run again to completion; sha256 of both."""
    reference_dir, resumed_dir = folder / "resume-reference", folder / "resume-interrupted"
    for path in (reference_dir, resumed_dir):
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    name = "merged.safetensors"  # the same name in both folders: the header may depend on it
    reference = export_run(_with(job, out=reference_dir / name, keep=True), cache_dir=cache_dir)
    check = ResumeCheck(len(job.models), job.method, False, "", reference.keys, reference.export_s)
    watched = _with(job, out=resumed_dir / name, keep=True, watched=True)
    journal = resumed_dir / f".{name}.partial.journal"
    killed, written, seen = _kill_half_way(watched, journal, cache_dir=cache_dir)
    if not killed:
        seen_text = ", ".join(seen) or "none"
        check.note = f"resume not available: no {journal.name} by half-way (files seen: {seen_text})"
        return check
    check.killed_after_keys, check.journal_records_at_kill = written, _journal_records(journal)
    finished = export_run(watched, cache_dir=cache_dir)
    check.available, check.resumed_s, check.resumed_notes = True, finished.export_s, finished.notes
    check.resumed_found_keys, check.resumed_keys = finished.found_keys or 0, finished.computed_keys or 0
    check.sha256_reference = _sha256(reference_dir / name)
    check.sha256_resumed = _sha256(resumed_dir / name)
    check.identical = check.sha256_reference == check.sha256_resumed
    check.leftovers = sorted(p.name for p in resumed_dir.iterdir() if p.name != name)
    return check


def _with(job: Job, **changes: Any) -> Job:
    return Job(**{**asdict(job), **{k: str(v) if isinstance(v, Path) else v for k, v in changes.items()}})


def _kill_half_way(job: Job, journal: Path, *, cache_dir: Path) -> tuple[bool, int, list[str]]:
    """Start the watched export; SIGKILL it once half its keys are written and ``journal`` exists.
    (killed, keys it had written, dot-files seen beside the output)."""
    process = subprocess.Popen(
        _command(job), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=_env(cache_dir)
    )  # fmt: skip
    assert process.stdout is not None
    progress = [0, 0]  # keys written, of total
    reader = threading.Thread(target=_read_progress, args=(process.stdout, progress), daemon=True)
    reader.start()
    killed, seen = False, set()
    while process.poll() is None:
        if progress[1] and 2 * progress[0] >= progress[1]:
            seen.update(p.name for p in journal.parent.iterdir() if p.name.startswith("."))
            if journal.exists():
                process.send_signal(signal.SIGKILL)
                killed = True
                break
        time.sleep(0.01)
    process.wait()
    reader.join()  # what the child printed before it died is still in the pipe
    return killed, progress[0], sorted(seen)


def _read_progress(stream: Any, progress: list[int]) -> None:
    for line in stream:
        parts = line.split()
        if len(parts) == 3 and parts[0] == "key":
            progress[:] = int(parts[1]), int(parts[2])


def _journal_records(journal: Path) -> int:
    with journal.open() as file:
        return sum('"key"' in line for line in file)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def jobs_for(models: Mapping[str, Path], **fields: Any) -> Job:
    """A job over ``models`` (read order: every model but the base c, then c)."""
    order = [name for name in models if name != "c"] + (["c"] if "c" in models else [])
    return Job(models={k: str(v) for k, v in models.items()}, order=order, **fields)
