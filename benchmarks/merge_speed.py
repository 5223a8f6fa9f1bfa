"""Merge speed (issue 3): live re-merge and streaming export against same-machine floors.

For a tiny model and a real-size model of ``--family`` (random fp16 weights at every real key shape
from ``automerge.arch.reference_keys``, EMA and scheduler buffers left out, no ``automerge.configs``
header so the standard configs are used: ``_sources.py``, written once per ``--workdir``) this measures, side by side in one run:

- live re-merge of every block (weighted sum, per-block α changed each repetition) against the copy
  floor ``torch.add(a, b, out=o)`` over one flat buffer of the same element count and dtype (reads 2
  copies, writes 1: the same bytes a weighted sum must move); one block alone (IN04 and the largest)
  against its byte share; add_difference and TIES over every block (informational, against the floor
  scaled to their minimum traffic of 3 reads + 1 write): ``_merge_live.py``;
- ``export_merge`` (add_difference of a, b, c to fp16) in a fresh subprocess, against the read+write
  floor (``safe_open(...).get_tensor`` of every key of every source, each copied into one reused
  buffer so its bytes are really read, then ``save_file`` of A's tensors + fsync, as the exporter
  fsyncs). After one warm-up floor, triples of floor, cold export (empty sha256 cache, as the first
  ``automerge export`` of new files) and warm export (sources already hashed, as at the end of
  ``automerge optimize``) run in ABBA order; peak RssAnon (``/proc/self/status``, sampled every 5 ms)
  of that subprocess against its baseline after imports: ``_merge_export.py``.

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
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from _common import GB, GIB, RESULTS, load_average, machine_info, print_table, work_folder, write_json
from _merge_export import ExportResult, export_child, measure_export
from _merge_live import LiveResult, Settings, make_sources, measure_live, ms

from automerge.dtypes import STORAGE_NAMES

DEFAULT_JSON = RESULTS / "merge_speed.json"
TARGET_RATIO = 1.5
TARGET_PEAK_BYTES = 2 * 1024**3
COLUMNS = ("what", "measured (median)", "floor", "ratio", "target / notes")


# -- report ----------------------------------------------------------------------------------------


def _verdict(ratio: float) -> str:
    return "met" if ratio <= TARGET_RATIO else "missed"


def live_rows(size: str, live: LiveResult) -> list[tuple[str, ...]]:
    """(what, measured, floor, ratio, target/notes) rows of the live re-merge."""
    ws = live.weighted_sum
    rows = [
        (
            f"{size}: weighted_sum, all {ws.blocks} blocks",
            ms(ws.merge.median_s),
            f"{ms(live.floor.median_s)} (add, {live.floor_bytes_moved / GB:.2f} GB moved)",
            f"{ws.ratio:.2f}×",
            f"≤ {TARGET_RATIO}×: {_verdict(ws.ratio)}",
        )
    ]
    for single in live.one_block:
        rows.append((
            f"{size}: weighted_sum, {single.block} only",
            ms(single.merge.median_s),
            ms(single.floor.median_s),
            f"{single.ratio:.2f}×",
            f"time share {single.time_share:.1%} vs byte share {single.byte_share:.1%}",
        ))  # fmt: skip
    for other in live.others:
        rows.append((
            f"{size}: {other.method}, all {other.blocks} blocks",
            ms(other.merge.median_s),
            f"{ms(other.floor_s)} (floor × 4/3, 3 reads + 1 write)",
            f"{other.ratio:.2f}×",
            other.notes or "informational",
        ))  # fmt: skip
    return rows


def export_rows(size: str, export: ExportResult) -> list[tuple[str, ...]]:
    """(what, measured, floor, ratio, target/notes) rows of the export."""
    first, floor = export.exports[0], export.floors[0]
    rows = []
    for hash_cache in ("cold", "warm"):
        rows.append((
            f"{size}: export add_difference fp16 (3 sources), {hash_cache} sha256 cache",
            ms(export.export(hash_cache).median_s),
            f"{ms(export.floor.median_s)} (read {floor.bytes_read / GB:.2f} GB + write {floor.bytes_written / GB:.2f} GB + fsync)",
            f"{export.ratio(hash_cache):.2f}×",
            f"≤ {TARGET_RATIO}×: {_verdict(export.ratio(hash_cache))}",
        ))  # fmt: skip
    if first.hash_s is not None and first.merge_only_s is not None:
        rows.append((
            f"{size}: export parts (first run, timed apart)",
            f"sha256 of the sources {ms(first.hash_s)}",
            f"merge loop without writing {ms(first.merge_only_s)}",
            "",
            "informational",
        ))  # fmt: skip
    rows.append((
        f"{size}: export peak RssAnon",
        f"{export.anon_peak_bytes / GIB:.2f} GiB",
        f"baseline {first.anon_baseline_bytes / GIB:.2f} GiB after imports",
        f"+{(export.anon_peak_bytes - first.anon_baseline_bytes) / GIB:.2f} GiB",
        f"< 2 GiB: {'met' if export.anon_peak_bytes < TARGET_PEAK_BYTES else 'missed'}",
    ))  # fmt: skip
    return rows


# -- main ------------------------------------------------------------------------------------------


def run(settings: Settings) -> dict[str, Any]:
    """Every size: sources, live re-merge, export; a table each; the results as plain data."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    results: dict[str, Any] = {
        "machine": machine_info(settings.device),
        "settings": {**asdict(settings), "engine_options": repr(settings.engine_options())},
        "sizes": {},
    }
    with work_folder(settings.workdir, prefix="merge-speed-") as folder:
        for size in settings.sizes:
            name = f"{size} {settings.family}"
            print(f"[{name}] sources")
            sources = make_sources(size, settings.family, folder, device=settings.device)
            loads = {"before_live": load_average()}
            print(f"[{name}] live re-merge")
            live = measure_live(sources, settings, size=size)
            loads["before_export"] = load_average()
            export = None
            if settings.export_pairs > 0:
                print(f"[{name}] export")
                export = measure_export(
                    sources,
                    folder,
                    pairs=settings.export_pairs,
                    device=settings.device,
                    threads=settings.threads,
                )
            loads["after_export"] = load_average()
            results["sizes"][size] = {
                "source_bytes": {k: p.stat().st_size for k, p in sources.items()},
                "load_average": loads,
                "live": live,
                "export": export,
            }
            rows = live_rows(name, live) + (export_rows(name, export) if export is not None else [])
            print_table(rows, title=f"Merge speed: {name}", columns=COLUMNS)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--family", default="sd1", choices=["sd1", "sdxl"])
    parser.add_argument("--dtype", default="fp16", choices=STORAGE_NAMES, help="live (output buffer) dtype")
    parser.add_argument("--source-dtype", default="fp16", choices=STORAGE_NAMES, help="resident source dtype")
    parser.add_argument("--reps", type=int, default=5, help="weighted sum and copy floor repetitions")
    parser.add_argument("--slow-reps", type=int, default=3, help="add_difference repetitions")
    parser.add_argument("--ties-reps", type=int, default=1, help="TIES repetitions at real size (0: skip)")
    parser.add_argument(
        "--ties-alpha-blocks",
        help="blocks whose α alone changes in TIES's α-only steps, comma list (default: all; fewer "
        "blocks hold fewer merged deltas, 4 bytes per element)",
    )
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
        ties_alpha_blocks=tuple(b.strip() for b in args.ties_alpha_blocks.split(","))
        if args.ties_alpha_blocks
        else None,
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
