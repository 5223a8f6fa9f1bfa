"""What every benchmark script shares: clocks (wall time with the device synchronised, CUDA events),
medians, host and device memory peaks, the machine's description, result tables, work folders and the
JSON output of result dataclasses (written atomically by ``automerge.files``).

Benchmarks are not tests: nothing here asserts a timing.
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from automerge.files import write_text_atomic

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
GB = 1e9
GIB = 1024**3


# -- clocks ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Every run in seconds, and their median."""

    runs_s: tuple[float, ...]

    @classmethod
    def of(cls, runs: Sequence[float]) -> Timing:
        return cls(tuple(runs))

    @property
    def median_s(self) -> float:
        return statistics.median(self.runs_s)


def _is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if _is_cuda(device):
        torch.cuda.synchronize()


def timed(fn: Callable[[], T], *, device: torch.device | str) -> tuple[float, T]:
    """Wall seconds of ``fn()`` and its value, the device synchronised before and after."""
    sync(device)
    started = time.perf_counter()
    value = fn()
    sync(device)
    return time.perf_counter() - started, value


def seconds(fn: Callable[[], object], *, device: torch.device | str, events: bool = False) -> float:
    """Seconds of ``fn()``: wall time with the device synchronised before and after (``timed``), or
    with ``events`` between CUDA events (``event_timed``)."""
    return (event_timed if events else timed)(fn, device=device)[0]


def event_timed(fn: Callable[[], T], *, device: torch.device | str) -> tuple[float, T]:
    """Seconds of ``fn()`` and its value: CUDA events around it on a GPU (after a synchronize), else
    perf_counter."""
    if not _is_cuda(device):
        started = time.perf_counter()
        value = fn()
        return time.perf_counter() - started, value
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    value = fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3, value


# -- memory ----------------------------------------------------------------------------------------


def host_memory_bytes() -> tuple[int, int]:
    """(VmRSS, RssAnon) of this process in bytes; RssAnon leaves memory-mapped file pages out."""
    found = {"VmRSS": 0, "RssAnon": 0}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in found:
            found[name] = int(value.split()[0]) * 1024
    return found["VmRSS"], found["RssAnon"]


def rss_anon_bytes() -> int:
    """Anonymous resident memory of this process (RssAnon)."""
    return host_memory_bytes()[1]


class HostMemorySampler:
    """Peak VmRSS and RssAnon while in the ``with`` block, sampled every ``interval_s`` by a background
    thread (and at entry and exit); ``samples`` counts the thread's samples."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.rss_bytes = self.anon_bytes = self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        rss, anon = host_memory_bytes()
        self.rss_bytes, self.anon_bytes = max(self.rss_bytes, rss), max(self.anon_bytes, anon)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()
            self.samples += 1

    def __enter__(self) -> HostMemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def reset_device_peak(device: torch.device | str) -> None:
    if _is_cuda(device):
        torch.cuda.reset_peak_memory_stats()


def device_peak(device: torch.device | str) -> int | None:
    """torch's peak allocated bytes on a GPU since the last reset; None on the CPU."""
    return int(torch.cuda.max_memory_allocated()) if _is_cuda(device) else None


def release(device: torch.device | str) -> None:
    """Free what the last measurement left (reference cycles, the CUDA cache) before the next one."""
    gc.collect()
    if _is_cuda(device):
        torch.cuda.empty_cache()


# -- the machine -----------------------------------------------------------------------------------


def load_average() -> tuple[float, float, float]:
    """1, 5 and 15 minute load averages: other processes on a shared machine skew CPU timings."""
    return os.getloadavg()


def machine_info(device: str) -> dict[str, Any]:
    """Date, CPU, cores, torch threads, RAM, versions, the device (and the GPU's name)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(ram / GIB, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if _is_cuda(device):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def package_versions(names: Sequence[str]) -> dict[str, str]:
    """Installed version of each distribution, "missing" where it is not installed."""
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


# -- output ----------------------------------------------------------------------------------------


def print_table(
    rows: Sequence[Sequence[str]], *, title: str, columns: Sequence[str], right_aligned: bool = False
) -> None:
    """A rich table, 200 characters wide; ``right_aligned``: every column but the first."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for index, column in enumerate(columns):
        table.add_column(column, justify="right" if right_aligned and index else "left")
    for row in rows:
        table.add_row(*row)
    Console(width=200).print(table)


def jsonable(value: Any) -> Any:
    """Dataclasses with their properties (ratios, medians), mappings, sequences, paths as strings."""
    if is_dataclass(value) and not isinstance(value, type):
        data = {f.name: jsonable(getattr(value, f.name)) for f in fields(value)}
        for name, attribute in vars(type(value)).items():
            if isinstance(attribute, property):
                data[name] = jsonable(getattr(value, name))
        return data
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """``data`` as indented JSON, written atomically (the folder created if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(jsonable(data), indent=2) + "\n")


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """diffusers' and transformers' notices and progress bars off inside the block (they would
    interleave with a benchmark's output)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.enable_progress_bar()
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])


# -- folders and the environment -------------------------------------------------------------------


@contextmanager
def work_folder(workdir: Path | None, *, prefix: str) -> Iterator[Path]:
    """``workdir`` (created, kept: generated sources are reused) or a temporary folder (deleted)."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        yield Path(folder)


@contextmanager
def environment(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` inside the block only."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old
