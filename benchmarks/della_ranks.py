"""DELLA's exact magnitude ranks (issue 16): what ``fused_places`` costs per element, by key size.

DELLA keeps element j of model i with a probability that grows with the rank of |Δ_ij| in its key, so
the export sorts every key of every model (the C kernel's ``fused_places``: an LSD radix sort over the
bits where the keys differ). This prints what that sort costs on the real SDXL key layout at tiny
width (``--workdir``'s tiny SDXL sources, written once as ``many_models.py`` writes them): ns per
element (less the ctypes calls, which the export makes in C), per key-size class, one thread, over ``--models`` fine-tunes in turn (so that no model's data
is cache-warm from the previous rep); and, for the keys of at least 1 M elements, one thread against
two ranking different models at once (side by side, alternated ``--reps`` times): the ratio says how
far the sort is from scaling with cores on this machine. Writes JSON::

    python benchmarks/della_ranks.py --workdir /tmp/mm-work

Not a test: nothing is asserted. Needs the compiled kernel (x86-64 with AVX2 and a C compiler).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from _common import RESULTS, machine_info, print_table, write_json
from _many_models_sources import model_names, tiny_sources
from safetensors.torch import load_file

from automerge.merge._fused_cpu import _DTYPES, fused_kernel

SIZE_CLASSES = (1 << 10, 1 << 12, 1 << 14, 1 << 20, 1 << 62)
"""Upper bounds (elements) of the key-size classes."""
LARGE = 1 << 20
"""Keys of at least this many elements are the thread-scaling set (the two token embeddings)."""


def _class_of(numel: int) -> int:
    return next(bound for bound in SIZE_CLASSES if numel <= bound)


def _rank_all(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``fused_places`` of every (model, base) pair, with this thread's own buffers."""
    kernel = fused_kernel()
    assert kernel is not None
    largest = max(base.numel() for _, base in pairs)
    places = torch.empty(largest, dtype=torch.int32)
    scratch = torch.empty(4 * largest, dtype=torch.int32)
    for model, base in pairs:
        code = kernel._places(
            model.data_ptr(),
            base.data_ptr(),
            _DTYPES[base.dtype],
            base.numel(),
            places.data_ptr(),
            scratch.data_ptr(),
        )
        assert code == 0, code


def _call_seconds(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The ctypes calls alone (0 elements each): the export makes them in C, so they are taken off."""
    kernel = fused_kernel()
    assert kernel is not None
    started = time.perf_counter()
    for model, base in pairs:
        kernel._places(model.data_ptr(), base.data_ptr(), _DTYPES[base.dtype], 0, 0, 0)
    return time.perf_counter() - started


def _seconds(groups: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]]) -> float:
    """Wall time of ranking each group on its own thread, all at once."""
    threads = [threading.Thread(target=_rank_all, args=(group,)) for group in groups]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="where the tiny SDXL sources are (or go)")
    parser.add_argument("--models", type=int, default=8, help="fine-tunes ranked against the base")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path, default=RESULTS / "della_ranks.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if fused_kernel() is None:
        raise SystemExit("della_ranks: the C kernel is not available on this machine")
    names = model_names(max(args.models + 1, 3))
    paths = tiny_sources(args.workdir / "tiny-sdxl", len(names))
    base = load_file(paths[names[2]])  # c is the base, as in many_models.py
    models = [load_file(paths[name]) for name in names if name != names[2]][: args.models]
    keys = [key for key, tensor in base.items() if tensor.dtype in _DTYPES and tensor.numel() > 0]
    pairs_by_class: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {bound: [] for bound in SIZE_CLASSES}
    for model in models:
        for key in keys:
            pairs_by_class[_class_of(base[key].numel())].append((model[key], base[key]))
    total = sum(base[key].numel() for key in keys)
    rows, classes = [], []
    for bound, pairs in pairs_by_class.items():
        if not pairs:
            continue
        elements = sum(b.numel() for _, b in pairs)
        times = [_seconds([pairs]) for _ in range(args.reps)]
        calls = min(_call_seconds(pairs) for _ in range(args.reps))
        ns = (min(times) - calls) * 1e9 / elements
        share = elements / (total * len(models))
        lower = SIZE_CLASSES[SIZE_CLASSES.index(bound) - 1] + 1 if bound != SIZE_CLASSES[0] else 1
        label = f"{lower:,} – {bound:,}" if bound != SIZE_CLASSES[-1] else f"≥ {lower:,}"
        classes.append({"elements_from": lower, "elements_to": bound, "keys": len(pairs) // len(models),
                        "share": share, "ns_per_element": ns, "seconds": times, "call_seconds": calls})  # fmt: skip
        rows.append([label, str(len(pairs) // len(models)), f"{share:.1%}", f"{ns:.2f} ns"])
    print_table(
        rows,
        title="fused_places by key size (one thread, best of reps, less the ctypes calls)",
        columns=["elements", "keys", "share", "per element"],
    )
    large = [(model[key], base[key]) for model in models for key in keys if base[key].numel() >= LARGE]
    one, two = [], []
    for _ in range(args.reps):  # alternated: one thread, then two
        one.append(_seconds([large]))
        two.append(_seconds([large[0::2], large[1::2]]))
    elements = sum(b.numel() for _, b in large)
    speedup = statistics.median(one) / statistics.median(two)
    print_table(
        [
            ["1", f"{statistics.median(one) * 1e9 / elements:.2f} ns", f"{statistics.median(one) * 1e9 / elements:.2f} ns", "1.00×"],
            ["2", f"{statistics.median(two) * 1e9 / elements:.2f} ns", f"{2 * statistics.median(two) * 1e9 / elements:.2f} ns", f"{speedup:.2f}×"],
        ],
        title=f"keys ≥ {LARGE:,} elements: one thread vs two (medians of {args.reps}, side by side)",
        columns=["threads", "wall per element", "core time per element", "speed-up"],
    )  # fmt: skip
    write_json(
        args.json,
        {
            "machine": machine_info("cpu"),
            "models": len(models),
            "elements_per_model": total,
            "classes": classes,
            "large_keys": {
                "elements": elements,
                "one_thread_s": one,
                "two_threads_s": two,
                "speedup": speedup,
            },
        },
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
