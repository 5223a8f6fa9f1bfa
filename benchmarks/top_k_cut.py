"""The export kernel's top-k cut of one key against its size, by the radix select and by the select
bracketed by a sample, for N fp16 models of one key (one thread, the best of ``--reps``), so the size
from which the sample pays (``_TOP_K_SAMPLE_FROM``) is chosen on measurements. Prints a table and
writes JSON::

    python benchmarks/top_k_cut.py --models 99 --sizes 65536,131072,262144,524288,1048576,4194304
"""

from __future__ import annotations

import argparse
import ctypes
import time
from pathlib import Path

import torch
from _common import RESULTS, machine_info, print_table, write_json

from automerge.merge import _fused_cpu

RADIX_ONLY = (1 << 31) - 1  # a sample_from no key reaches


def cut_seconds(models: int, numel: int, sample_from: int, reps: int) -> float:
    """The best of ``reps`` calls of ``fused_top_k_cuts`` over ``models`` keys of ``numel`` elements
    (Δ ~ N(0, 1e-3²) on a N(0, 0.05²) base, k = numel / 2)."""
    kernel = _fused_cpu.fused_kernel()
    assert kernel is not None, "no fused CPU kernel here"
    generator = torch.Generator().manual_seed(numel)
    base = (torch.randn(numel, generator=generator) * 0.05).half()
    rows = [(base.float() + torch.randn(numel, generator=generator) * 1e-3).half() for _ in range(models)]
    pointers = (ctypes.c_void_p * models)(*(row.data_ptr() for row in rows))
    thresholds, cuts = (ctypes.c_int32 * models)(), (ctypes.c_int64 * models)()
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        code = kernel._top_k_cut(
            pointers, models, base.data_ptr(), 0, numel, numel // 2, _fused_cpu._TOP_K_GATHER, sample_from,
            ctypes.addressof(thresholds), ctypes.addressof(cuts),
        )  # fmt: skip
        best = min(best, time.perf_counter() - started)
        assert code == 0
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=99)
    parser.add_argument("--sizes", default="65536,131072,262144,524288,1048576,4194304")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", type=Path, default=RESULTS / "top_k_cut.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, results = [], []
    for numel in (int(size) for size in args.sizes.split(",")):
        radix = cut_seconds(args.models, numel, RADIX_ONLY, args.reps)
        sampled = cut_seconds(args.models, numel, 1, args.reps)
        per_element = 1e9 / (args.models * numel)
        results.append({"numel": numel, "radix_s": radix, "sampled_s": sampled})
        rows.append(
            [f"{numel:,}", f"{radix * per_element:.2f} ns", f"{sampled * per_element:.2f} ns",
             "sample" if sampled < radix else "radix"]
        )  # fmt: skip
    print_table(
        rows,
        title=f"top-k cut per element and model ({args.models} fp16 models, one thread, best of {args.reps})",
        columns=["elements", "radix select", "bracketed by a sample", "faster"],
    )
    write_json(args.json, {"machine": machine_info("cpu"), "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
