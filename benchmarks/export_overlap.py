"""Export I/O overlap (issue 3 follow-up): what the safetensors writer's early writeback buys.

Side by side in one run: ``export_merge`` (add_difference of the SD1-size sources a, b, c to fp16,
sources already hashed) with the writer's early writeback off (the whole file flushed by the final
fsync) and on (the kernel asked to write back every ``WRITEBACK_BYTES`` as they are written, as
shipped), in alternating order, against the read+write floor of ``merge_speed`` (``_merge_export``).
(A background writer thread was measured the same way at commit a52c8a8 and gained nothing; it was
removed.)

Prints a table and writes JSON::

    python benchmarks/export_overlap.py --workdir /tmp/merge-speed-work   # reuses merge_speed's sources

Not a test: timings are never asserted anywhere.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS, environment, load_average, machine_info, work_folder, write_json
from _merge_export import read_write_floor
from _merge_live import make_plan, make_sources

from automerge.checkpoints import CACHE_DIR_VARIABLE, cached_sha256
from automerge.merge import export_merge

# Not public API: the writer's writeback threshold is a module constant that this ablation switches;
# automerge.checkpoints exports no setting for it (reported).
from automerge.checkpoints import _writer  # isort: skip

DEFAULT_JSON = RESULTS / "export_overlap.json"
NO_WRITEBACK = 1 << 62
VARIANTS = {
    "no writeback": {"WRITEBACK_BYTES": NO_WRITEBACK},
    "writeback": {"WRITEBACK_BYTES": _writer.WRITEBACK_BYTES},
}


@dataclass
class Result:
    floors_s: list[float] = field(default_factory=list)
    exports_s: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in VARIANTS})
    order: list[str] = field(default_factory=list)

    @property
    def floor_median_s(self) -> float:
        return statistics.median(self.floors_s)

    @property
    def medians_s(self) -> dict[str, float]:
        return {name: statistics.median(runs) for name, runs in self.exports_s.items()}

    @property
    def ratios(self) -> dict[str, float]:
        return {name: median / self.floor_median_s for name, median in self.medians_s.items()}


@contextmanager
def writer_settings(settings: dict[str, int]) -> Iterator[None]:
    old = {name: getattr(_writer, name) for name in settings}
    for name, value in settings.items():
        setattr(_writer, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(_writer, name, value)


def timed_export(sources: dict[str, Path], out: Path, variant: str) -> float:
    plan = make_plan(sources, "add_difference", {"alpha": 0.5})
    gc.collect()
    with writer_settings(VARIANTS[variant]):
        started = time.perf_counter()
        export_merge(plan, out, dtype=torch.float16)
        seconds = time.perf_counter() - started
    plan.close()
    out.unlink()
    return seconds


def measure(sources: dict[str, Path], folder: Path, reps: int) -> Result:
    out = folder / "export-overlap.safetensors"
    for path in sources.values():
        cached_sha256(path)  # warm: this measures the writer, not the hashing
    read_write_floor(sources, out)  # warm-up: page cache, writer
    result = Result()
    names = list(VARIANTS)
    for rep in range(reps):
        result.floors_s.append(read_write_floor(sources, out).total_s)
        result.order.append("floor")
        print(f"  floor: {result.floors_s[-1]:.2f} s")
        for variant in names[rep % len(names) :] + names[: rep % len(names)]:
            result.exports_s[variant].append(timed_export(sources, out, variant))
            result.order.append(variant)
            print(f"  {variant}: {result.exports_s[variant][-1]:.2f} s")
    result.floors_s.append(read_write_floor(sources, out).total_s)
    result.order.append("floor")
    return result


def print_table(result: Result) -> None:
    print(f"{'writer':<18} {'median':>9} {'runs':<24} {'/ floor':>8}")
    print(f"{'floor (read+write)':<18} {result.floor_median_s:>8.2f}s {_runs(result.floors_s):<24}")
    for name, median in result.medians_s.items():
        print(f"{name:<18} {median:>8.2f}s {_runs(result.exports_s[name]):<24} {result.ratios[name]:>7.2f}×")


def _runs(runs: list[float]) -> str:
    return ", ".join(f"{r:.2f}" for r in runs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="folder for the SD1-size sources (reused)")
    parser.add_argument("--reps", type=int, default=3, help="exports per variant")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with (
        work_folder(args.workdir, prefix="export-overlap-") as folder,
        environment(CACHE_DIR_VARIABLE, str(folder / "hash-cache-overlap")),
    ):
        sources = make_sources("real", "sd1", folder, device="cpu")
        load_before = load_average()
        result = measure(sources, folder, args.reps)
        data: dict[str, Any] = {
            "machine": machine_info("cpu"),
            "load_average": {"before": load_before, "after": load_average()},
            "result": result,
            "writer": {"writeback_bytes": _writer.WRITEBACK_BYTES},
        }
    print_table(result)
    data["wall_s"] = time.perf_counter() - started
    write_json(args.json, data)
    print(f"wrote {args.json} ({data['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
