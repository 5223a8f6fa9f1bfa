"""Many models (issue 16): the streamed N-model export against the read floor, N = 3 … 100 sources.

Sources (``_many_models_sources.py``, written once into ``--workdir`` and reused): N tiny SDXL models
with every key of a real SDXL file (``automerge.tiny``, ~11.5 MB each) and, with ``--real-sd1 N``, N
real-size SD1 models (random fp16 at every real key shape, ~2.13 GB each); in both, c is a base and
every other model is the base plus small seeded noise (fine-tunes of one base). Models are named a, b,
c, d, …, z, aa, ab, … as recipes name them.

For each N, one warm-up read of the N files first (so that the floor and the exports both read from
the page cache; with ``--cold``, instead, every floor and export first evicts the N files from the page
cache with ``posix_fadvise(DONTNEED)``, so both read the disk, as 100 real SDXL sources would), the
sources' sha256 in a warm hash cache (the export hashes them in the background;
a cold cache would add a second read of every file), then in fresh subprocesses (so each one's memory
is its own: ``_many_models_runs.py``):

- the **read floor**: every tensor of the N sources read once through automerge's reader (a view of
  the file's memory map), key by key in the export's order, each copied into one reused buffer (a
  bare view reads nothing); floors before, between and after the exports;
- ``export_merge`` (fp16 output, written resumably and fsynced: the floor writes nothing) of
  ``open_plan(models={a, b, c, …}, method)`` for every method: ``average`` (no base, weights
  ``weight.NAME`` 0.5, 1, 1.5, 0.5, … in model order), ``ties`` (base c, density 0.5),
  ``dare`` (base c, density 0.5, seed 1234), ``geometric_median`` (max_iter 8), ``model_stock``
  (base c); for no-base methods c is one more model. Wall time, peak RssAnon (``/proc/self/status``,
  sampled every 10 ms: memory-mapped file pages are not anonymous, so this is the memory the export
  itself holds), peak VmRSS, ``ru_maxrss`` and the output's size.

Reported: export / floor (medians, same run), and per method the flatness of the anonymous peak from
N = 10 to 100 (max / min). ``--resume-check N`` SIGKILLs an N-source TIES export once half its keys
are written (and its ``.<name>.partial.journal`` exists), runs it again to completion and compares its
sha256 with an uninterrupted export's; keys redone = keys written by both runs. Prints tables, writes JSON and a figure::

    python benchmarks/many_models.py --counts 3,5 --real-sd1 0 --resume-check 5    # smoke, ~10 min
    python benchmarks/many_models.py --real-sd1 0 --resume-check 30                # tiny SDXL, N ≤ 100
    python benchmarks/many_models.py --counts "" --real-sd1 10 \
        --json benchmarks/results/many_models_sd1.json                            # 10 real-size SD1

(Both on 2 idle cores: about 1–1.5 h each; the SD1 run needs ~25 GB in ``--workdir``. Sources larger
than the page cache can hold are reported as not cached: on a 23.5 GiB machine 10 SD1 files are.)

Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import GB, RESULTS, ROOT, environment, load_average, machine_info, print_table, write_json
from _many_models_runs import ExportRun, FloorRun, Job, ResumeCheck, child, export_run, floor_run, jobs_for
from _many_models_runs import resume_check as run_resume_check
from _many_models_sources import (
    available_memory_bytes,
    model_names,
    read_through,
    real_sd1_sources,
    tiny_sources,
)

from automerge.checkpoints import CACHE_DIR_VARIABLE, cached_sha256
from automerge.merge._fused_cpu import fused_kernel
from automerge.merge.methods import METHODS

DEFAULT_JSON = RESULTS / "many_models.json"
DEFAULT_PLOT = ROOT / "benchmarks" / "figures" / "many_models.png"
DEFAULT_WORKDIR = Path("/tmp/many-models-work")
DARE_SEED = 1234
METHOD_PARAMS: dict[str, dict[str, float]] = {
    "average": {},  # + weight.NAME per model: params_for
    "ties": {"density": 0.5},
    "dare": {"density": 0.5},
    "geometric_median": {"max_iter": 8},
    "model_stock": {},
}
MIB = 1024**2
COLUMNS = (
    "sources", "N", "method", "export (median)", "read floor", "ratio",
    "RssAnon imports → plan → peak", "peak VmRSS", "ru_maxrss", "output",
)  # fmt: skip


@dataclass(frozen=True)
class Settings:
    counts: tuple[int, ...]
    methods: tuple[str, ...]
    real_sd1: int
    reps: int
    resume_check: int
    threads: int | None
    workdir: Path
    cold: bool = False  # every floor and export reads the sources from the disk


@dataclass
class CountResult:
    """One set of N sources: its floors and every method's exports."""

    family: str  # "tiny sdxl" or "real sd1"
    sources: int
    source_bytes: int
    warmup_s: float  # the read() of every file that put them in the page cache
    floors: list[FloorRun] = field(default_factory=list)
    exports: dict[str, list[ExportRun]] = field(default_factory=dict)
    load_average: list[tuple[float, float, float]] = field(default_factory=list)

    @property
    def floor_s(self) -> float:
        return statistics.median(run.floor_s for run in self.floors)

    def export_s(self, method: str) -> float:
        return statistics.median(run.export_s for run in self.exports[method])

    def anon_peak(self, method: str) -> int:
        return max(run.anon_peak_bytes for run in self.exports[method])

    @property
    def export_medians_s(self) -> dict[str, float]:
        return {method: self.export_s(method) for method in self.exports}

    @property
    def anon_peaks_bytes(self) -> dict[str, int]:
        return {method: self.anon_peak(method) for method in self.exports}

    @property
    def ratios(self) -> dict[str, float]:
        return {method: self.export_s(method) / self.floor_s for method in self.exports}


# -- measuring --------------------------------------------------------------------------------------


def measure_count(
    family: str, models: Mapping[str, Path], settings: Settings, *, methods: Sequence[str], cache_dir: Path
) -> CountResult:
    """Warm the hash and page caches, then floor, every method's export, floor, … (``reps`` rounds)."""
    label = f"{family} ×{len(models)}"
    with environment(CACHE_DIR_VARIABLE, str(cache_dir)):
        for path in models.values():
            cached_sha256(path)
    if settings.cold:
        size, warmup_s = sum(path.stat().st_size for path in models.values()), 0.0
        print(f"[{label}] {size / GB:.2f} GB, evicted from the page cache before each floor and export")
    else:
        size, warmup_s = read_through(models.values())
        cached = (
            "from the page cache"
            if size < 0.8 * available_memory_bytes()
            else "NOT all cached (RAM too small)"
        )
        print(
            f"[{label}] warm-up read {size / GB:.2f} GB in {warmup_s:.1f} s: floor and exports read {cached}"
        )
    result = CountResult(family, len(models), size, warmup_s)
    out = settings.workdir / "many-models-out.safetensors"
    base_job = jobs_for(models, out=str(out), threads=settings.threads, cold=settings.cold)
    for round_ in range(settings.reps + 1):
        result.load_average.append(load_average())
        result.floors.append(floor_run(base_job, cache_dir=cache_dir))
        last = result.floors[-1]
        print(f"[{label}] read floor: key by key {last.read_s:.2f} s, in 16 MiB slices {last.bulk_s:.2f} s")
        if round_ == settings.reps:
            break
        for method in methods:
            job = jobs_for(
                models, method=method, params=params_for(method, list(models)), seed=DARE_SEED,
                out=str(out), threads=settings.threads, cold=settings.cold,
            )  # fmt: skip
            for stale in out.parent.glob(f".{out.name}.partial*"):  # a killed run's: it would be resumed
                stale.unlink()
            run = export_run(job, cache_dir=cache_dir)
            result.exports.setdefault(method, []).append(run)
            print(
                f"[{label}] {method}: {run.export_s:.2f} s, peak RssAnon {run.anon_peak_bytes / MIB:.0f} MiB"
            )
    return result


def params_for(method: str, names: Sequence[str]) -> dict[str, float]:
    """The method's parameters; ``average`` also weighs the models 0.5, 1, 1.5, 0.5, … in order."""
    params = dict(METHOD_PARAMS.get(method, {}))
    if method == "average":
        params.update({f"weight.{name}": 0.5 + 0.5 * (i % 3) for i, name in enumerate(names)})
    return params


def available_methods(wanted: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The wanted methods that are registered, and why the others are skipped."""
    skipped = {
        m: f"method '{m}' is not registered in this checkout (registered: {', '.join(METHODS.names())}): skipped"
        for m in wanted
        if m not in METHODS
    }
    for message in skipped.values():
        print(message)
    return [m for m in wanted if m not in skipped], skipped


# -- reporting --------------------------------------------------------------------------------------


def rows(result: CountResult) -> list[tuple[str, ...]]:
    """One table row per method of one set of sources."""
    out = []
    for method, runs in result.exports.items():
        first = runs[0]
        anon = f"{_mib(first.anon_imports_bytes)} → {_mib(first.anon_plan_bytes)} → {_mib(result.anon_peak(method))}"
        out.append((
            result.family, str(result.sources), method,
            f"{result.export_s(method):.2f} s", f"{result.floor_s:.2f} s", f"{result.ratios[method]:.1f}×",
            anon, _mib(max(r.rss_peak_bytes for r in runs)), _mib(max(r.maxrss_bytes for r in runs)),
            f"{first.bytes_written / 1e6:.0f} MB",
        ))  # fmt: skip
    return out


def _mib(value: int) -> str:
    return f"{value / MIB:.0f} MiB"


def flatness(results: Sequence[CountResult], methods: Sequence[str], *, low: int = 10) -> dict[str, Any]:
    """Per method: max / min of the peak RssAnon over N ≥ ``low`` (all N when fewer than two are)."""
    tiny = [r for r in results if r.family == "tiny sdxl"]
    chosen = [r for r in tiny if r.sources >= low]
    chosen = chosen if len(chosen) >= 2 else tiny
    if len(chosen) < 2:
        return {}
    counts = [r.sources for r in chosen]
    out: dict[str, Any] = {"range": f"{min(counts)}→{max(counts)}"}
    for method in methods:
        peaks = [r.anon_peak(method) for r in chosen if method in r.exports]
        if peaks:
            out[method] = {"max_over_min": max(peaks) / min(peaks), "peaks_mib": [p / MIB for p in peaks]}
    return out


def print_flatness(flat: Mapping[str, Any]) -> None:
    if not flat:
        return
    parts = [f"{m} {v['max_over_min']:.2f}×" for m, v in flat.items() if m != "range"]
    print(f"peak RssAnon flatness, N {flat['range']} (max / min): {', '.join(parts)}")


def print_resume(check: ResumeCheck) -> None:
    head = f"resume check ({check.method}, {check.sources} sources"
    if not check.available:
        print(f"{head}): {check.note}")
        return
    verdict = "IDENTICAL" if check.identical else "DIFFERENT"
    print(
        f"{head}, {check.keys} keys): SIGKILLed after {check.killed_after_keys} keys written "
        f"({check.journal_records_at_kill} in the journal); the rerun found {check.resumed_found_keys}, "
        f"wrote {check.resumed_keys} in {check.resumed_s:.1f} s (uninterrupted: {check.reference_s:.1f} s); "
        f"keys redone: {check.keys_redone}; output {verdict} to the uninterrupted export "
        f"(sha256 {check.sha256_resumed[:16]}… vs {check.sha256_reference[:16]}…); "
        f"notices: {' / '.join(check.resumed_notes or []) or 'none'}; "
        f"left beside the output: {', '.join(check.leftovers or []) or 'nothing'}"
    )


def figure(path: Path, results: Sequence[CountResult], methods: Sequence[str]) -> Path | None:
    from _many_models_plot import Panel, plot

    tiny = [r for r in results if r.family == "tiny sdxl"]
    if not tiny:
        return None
    times = {m: [(r.sources, r.export_s(m)) for r in tiny if m in r.exports] for m in methods}
    anon = {m: [(r.sources, r.anon_peak(m) / MIB) for r in tiny if m in r.exports] for m in methods}
    imports = [
        (r.sources, statistics.median(x.anon_imports_bytes for v in r.exports.values() for x in v) / MIB)
        for r in tiny
    ]
    return plot(
        path,
        [
            Panel(
                "export wall time",
                "s, log",
                times,
                {"read floor": [(r.sources, r.floor_s) for r in tiny]},
                True,
            ),
            Panel("peak RssAnon", "MiB", anon, {"after imports": imports}, False),
        ],
        title="Streamed N-model export, tiny SDXL (real key layout): time and anonymous memory vs sources",
    )


READS = {False: "from the page cache", True: "from the disk (--cold)"}


# -- main -------------------------------------------------------------------------------------------


def run(settings: Settings, *, plot_path: Path) -> dict[str, Any]:
    """1. methods, 2. tiny SDXL counts, 3. real SD1, 4. resume check, 5. tables, figure."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    methods, skipped = available_methods(settings.methods)
    cache_dir = settings.workdir / "hash-cache"
    with environment(CACHE_DIR_VARIABLE, str(cache_dir)):
        fused_kernel()  # compiled into the children's cache once, not inside the first export timed
    results: list[CountResult] = []
    needed = max([*settings.counts, settings.resume_check, 0])
    tiny = tiny_sources(settings.workdir / "tiny-sdxl", needed) if needed else {}
    for count in settings.counts:
        models = {name: tiny[name] for name in model_names(count)}
        results.append(measure_count("tiny sdxl", models, settings, methods=methods, cache_dir=cache_dir))
    if settings.real_sd1:
        real = real_sd1_sources(settings.workdir / "real-sd1", settings.real_sd1)
        results.append(measure_count("real sd1", real, settings, methods=methods, cache_dir=cache_dir))
    check = None
    if settings.resume_check:
        models = {name: tiny[name] for name in model_names(settings.resume_check)}
        job = jobs_for(
            models, method="ties", params=params_for("ties", list(models)), threads=settings.threads
        )
        check = run_resume_check(job, settings.workdir / "resume", cache_dir=cache_dir)
    table = [row for result in results for row in rows(result)]
    if table:
        print_table(
            table,
            title=f"Streamed N-model export vs read floor (both {READS[settings.cold]}, warm sha256 cache)",
            columns=COLUMNS,
        )  # fmt: skip
    flat = flatness(results, methods)
    print_flatness(flat)
    if check is not None:
        print_resume(check)
    drawn = figure(plot_path, results, methods) if results else None
    if drawn is not None:
        print(f"wrote {drawn}")
    return {
        "machine": machine_info("cpu"),
        "settings": asdict(settings),
        "notes": (
            "each N: every floor and export first evicts the sources (posix_fadvise DONTNEED): both read the disk"
            if settings.cold
            else "each N: one warm-up read() of every file first, so floor and exports read from the page cache"
        )
        + "; sha256 cache warm; every measurement in a fresh subprocess; fp16 output on the CPU",
        "cold": settings.cold,
        "skipped_methods": skipped,
        "method_params": {m: METHOD_PARAMS.get(m, {}) for m in methods},
        "average_weights": "weight.NAME = 0.5, 1, 1.5, 0.5, … in model order (a, b, c, d, …)",
        "dare_seed": DARE_SEED,
        "results": results,
        "flatness": flat,
        "resume_check": check,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="3,10,30,100", help="tiny SDXL source counts ('' for none)")
    parser.add_argument("--methods", default=",".join(METHOD_PARAMS), help="comma list of merge methods")
    parser.add_argument(
        "--real-sd1", type=int, default=10, help="real-size SD1 sources (0 skips; ~2.13 GB each)"
    )
    parser.add_argument("--reps", type=int, default=1, help="exports per (method, N); floors are reps + 1")
    parser.add_argument("--resume-check", type=int, default=0, help="sources of the resume check (0 skips)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument(
        "--cold", action="store_true",
        help="evict the sources from the page cache before each floor and export (both read the disk)",
    )  # fmt: skip
    parser.add_argument(
        "--workdir", type=Path, default=DEFAULT_WORKDIR, help="sources are written here, reused"
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="where to draw the figure")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    try:
        counts = tuple(int(c) for c in args.counts.split(",") if c.strip())
    except ValueError:
        raise SystemExit(f"--counts takes whole numbers separated by commas, got {args.counts!r}") from None
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    for option, value in (("--counts", min(counts, default=3)), ("--real-sd1", args.real_sd1 or 3),
                          ("--resume-check", args.resume_check or 3)):  # fmt: skip
        if value < 3:
            raise SystemExit(f"{option}: at least 3 sources (a, b and the base c), got {value}")
    if args.reps < 1:
        raise SystemExit(f"--reps must be at least 1, got {args.reps}")
    return Settings(
        counts, methods, args.real_sd1, args.reps, args.resume_check, args.threads, args.workdir, args.cold
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(Job(**json.loads(args.child)))))
        return
    settings = settings_from(args)
    settings.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = run(settings, plot_path=args.plot)
    results["wall_s"] = time.perf_counter() - started
    write_json(args.json, results)
    print(f"wrote {args.json} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
