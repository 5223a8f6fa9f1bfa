"""One large key through a TIES-family method, as the streamed export merges it: N fp16 models and a
base of ``--numel`` elements (an SD1 conv weight is up to 14.7 M), seeded, one torch thread. Prints
the best of ``--reps`` and the output's sha256 (so runs of two versions can be compared side by side:
run it with ``PYTHONPATH`` at each checkout, alternating), and writes JSON::

    python benchmarks/sparse_key.py --methods ties,dare_ties --models 5 --numel 8000000
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import torch
from _common import RESULTS, machine_info, print_table, write_json

from automerge.merge.methods import METHODS, merge_tensor
from automerge.merge.methods._task_core import Noise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="ties")
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--numel", type=int, default=8_000_000)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--json", type=Path, default=RESULTS / "sparse_key.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(args.numel, generator=generator).half()
    models = [
        (base.float() + 0.01 * torch.randn(args.numel, generator=generator)).half()
        for _ in range(args.models)
    ]
    rows, results = [], {}
    for name in args.methods.split(","):
        method = METHODS.get(name)
        best, out = float("inf"), None
        for _ in range(args.reps):
            started = time.perf_counter()
            out = merge_tensor(
                method,
                models,
                base,
                key="k",
                params={"alpha": 1.0, "density": 0.5},
                noise=Noise(0, "k") if method.random else None,
            )
            best = min(best, time.perf_counter() - started)
        digest = hashlib.sha256(out.numpy().tobytes()).hexdigest()[:16]
        results[name] = {"seconds": best, "sha256_16": digest}
        rows.append([name, f"{args.models} × {args.numel:,}", f"{best:.2f} s", digest])
    print_table(
        rows,
        title="one key through the method (best of reps)",
        columns=["method", "models × elements", "time", "sha256"],
    )
    write_json(args.json, {"machine": machine_info("cpu"), "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
