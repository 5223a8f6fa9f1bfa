"""The live task-arithmetic merge (ties, dare, dare_ties) in one pass on a CPU (``_fused_cpu.c``), and
the export's kernels: the weighted average of many sources, TIES/DARE with their top-k cuts, Model
Stock, and runs of small keys in one call.

``_sparse_live`` runs it as about twenty torch passes over each chunk, bound by the number of passes;
the C file computes the same float32 operations in the same order in one pass (AVX2 + F16C), so its
bits are the torch path's. torch.compile would fuse the passes too, but its CPU code is built with
``-fno-signed-zeros``, which cannot promise the export's bits.

The file is compiled on first use with the system C compiler (``$CC``, else ``cc``) into automerge's
cache folder, named by the sha256 of the source and the compiler's path (about a second, once per
machine). Where there is no compiler, the CPU lacks AVX2/F16C, the machine is not x86-64, or
``AUTOMERGE_FUSED_CPU=0``, ``fused_kernel()`` is None and the torch path runs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from automerge.files import cache_dir

_log = logging.getLogger(__name__)
T = TypeVar("T")

SOURCE = Path(__file__).with_name("_fused_cpu.c")
DISABLE_VARIABLE = "AUTOMERGE_FUSED_CPU"
MAX_MODELS = 64
_DTYPES = {torch.float16: 0, torch.float32: 1}  # the C file's F16, F32
_FLAGS = ["-O2", "-mavx2", "-mf16c", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", "-lm"]
_PIECE = 1 << 20  # elements per call: a key larger than this is split among the threads
_PLACES_PARALLEL_BYTES = 256 << 20  # models ranked in parallel while each one's scratch is below this
_TOP_K_GATHER = 1 << 20  # top-k of a large key: the elements of t's bucket gathered, up to this many
_TOP_K_SAMPLE_FROM = 1 << 20  # top-k of a key this large: first a one-pass select bracketed by a sample
# (below it the radix select was as fast or faster: benchmarks/top_k_cut.py, BENCHMARKS.md)
_DELLA_GROUP, _DELLA_GROUP_BYTES = 8, 64 << 20  # the C file's DELLA_GROUP, DELLA_GROUP_BYTES
_DELLA_SPLIT = 1 << 18  # DELLA of a key this large: its models' sorts and its elements over the threads
_GEOMETRIC_MEDIAN_SPLIT = 1 << 18  # a key this large: every geometric-median pass split among the threads
_GROUP_WORK = 1 << 20  # element-passes of a run worth splitting among the threads (~1 ms of work)
_LARGEST_TERM_SLACK = 1e-5  # the C file's LARGEST_TERM_SLACK


class _Args(ctypes.Structure):
    """``fused_args`` of the C file, field for field."""

    _fields_ = [
        ("n", ctypes.c_int64),
        ("models", ctypes.c_int32),
        ("in_dtype", ctypes.c_int32),
        ("out_dtype", ctypes.c_int32),
        ("drop", ctypes.c_int32),
        ("elect", ctypes.c_int32),
        ("weighted", ctypes.c_int32),
        ("unit_agree", ctypes.c_int32),
        ("divide", ctypes.c_int32),
        ("k", ctypes.c_int32),
        ("density", ctypes.c_float),
        ("alpha", ctypes.c_float),
        ("tiny", ctypes.c_float),
        ("base", ctypes.c_void_p),
        ("sources", ctypes.POINTER(ctypes.c_void_p)),
        ("statistics", ctypes.POINTER(ctypes.c_void_p)),
        ("weights", ctypes.POINTER(ctypes.c_float)),
        ("agree", ctypes.POINTER(ctypes.c_float)),
        ("out", ctypes.c_void_p),
        ("merged_out", ctypes.c_void_p),
    ]


class _TaskArgs(ctypes.Structure):
    """``task_args`` of the C file, field for field."""

    _fields_ = [
        ("start", ctypes.c_int64),
        ("stop", ctypes.c_int64),
        ("models", ctypes.c_int32),
        ("in_dtype", ctypes.c_int32),
        ("out_dtype", ctypes.c_int32),
        ("keep_mode", ctypes.c_int32),
        ("elect", ctypes.c_int32),
        ("weighted", ctypes.c_int32),
        ("unit_agree", ctypes.c_int32),
        ("divide", ctypes.c_int32),
        ("draw_threshold", ctypes.c_int32),
        ("density", ctypes.c_float),
        ("alpha", ctypes.c_float),
        ("tiny", ctypes.c_float),
        ("base", ctypes.c_void_p),
        ("sources", ctypes.POINTER(ctypes.c_void_p)),
        ("thresholds", ctypes.POINTER(ctypes.c_int32)),
        ("cuts", ctypes.POINTER(ctypes.c_int64)),
        ("draw_keys", ctypes.POINTER(ctypes.c_uint32)),
        ("weights", ctypes.POINTER(ctypes.c_float)),
        ("agree", ctypes.POINTER(ctypes.c_float)),
        ("out", ctypes.c_void_p),
    ]


@dataclass(frozen=True)
class FusedRule:
    """One merge's parameters as the kernel takes them (``_sparse_live._Rule`` resolved)."""

    drop: bool  # keep by draw (bits(u) < threshold), else by place (place < k)
    elect: bool
    density: float  # drop: Δ is divided by it (unless 1)
    alpha: float
    weights: tuple[float, ...]  # w_i
    agree_weights: tuple[float, ...]  # v_i


@dataclass(frozen=True)
class ExportRule:
    """One key's task-arithmetic merge for the export's kernel (``fused_task_export``): keep by top-k
    (``keep_count`` elements of each model's |Δ|) or by draws (bits(u) < ``draw_threshold``, u drawn
    with each model's ``draw_keys``; DELLA: u < p_j, ``fused_della_run``), then the sum or the sign
    election, C + α·merged."""

    elect: bool
    alpha: float
    weights: tuple[float, ...]  # w_i
    agree_weights: tuple[float, ...]  # v_i
    keep_count: int | None = None  # top-k: k
    density: float = 1.0  # drop: Δ is divided by it (unless 1); DELLA: its density
    draw_threshold: int = 0
    draw_keys: bytes = b""  # each model's (k0, k1), little-endian uint32 (``noise_key_bytes``)
    spread: float | None = None  # DELLA (keep where u < p_j, its rank's probability): ε'


@dataclass(frozen=True)
class KeyRun:
    """Consecutive keys laid back to back, merged in one call (``task_export_run``): each key's size
    (elements, in order) and how it keeps: top-k, each key's k (``keep_counts``); else by draws,
    each model's draw keys, key after key (``draw_keys``: keys × models pairs of little-endian
    uint32, ``noise_key_bytes``)."""

    sizes: tuple[int, ...]
    keep_counts: tuple[int, ...] | None = None
    draw_keys: bytes = b""


_KEEP_TOP_K, _KEEP_DRAWS, _NOT_FINITE = 0, 1, 2


@dataclass(frozen=True)
class KeyPart:
    """Elements ``start … stop − 1`` of a block's flat buffers, kept where statistic < ``limit``."""

    start: int
    stop: int
    limit: int


class FusedKernel:
    """The compiled kernel and the threads that call it (ctypes releases the GIL during a call)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._function = library.fused_task_arithmetic
        self._function.argtypes = [ctypes.POINTER(_Args)]
        self._function.restype = ctypes.c_int
        self._weighted_mean = library.fused_weighted_mean
        self._weighted_mean.argtypes = [
            ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int32,
            ctypes.POINTER(ctypes.c_float), ctypes.c_int32, ctypes.c_int64, ctypes.c_float,
        ]  # fmt: skip
        self._weighted_mean.restype = ctypes.c_int
        self._task_export = library.fused_task_export
        self._task_export.argtypes = [ctypes.POINTER(_TaskArgs)]
        self._task_export.restype = ctypes.c_int
        self._top_k_cut = library.fused_top_k_cuts
        self._top_k_cut.argtypes = [
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64,
            ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        self._top_k_cut.restype = ctypes.c_int
        self._task_run = library.fused_task_run
        self._task_run.argtypes = [
            ctypes.POINTER(_TaskArgs), ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_int64,
        ]  # fmt: skip
        self._task_run.restype = ctypes.c_int
        self._della_run = library.fused_della_run
        self._della_run.argtypes = [
            ctypes.POINTER(_TaskArgs), ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float,
        ]  # fmt: skip
        self._della_run.restype = ctypes.c_int
        self._della_add = library.fused_della_add
        self._della_add.argtypes = [
            ctypes.POINTER(_TaskArgs), ctypes.c_int32, ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p,
            ctypes.c_float, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
        ]  # fmt: skip
        self._della_finish = library.fused_della_finish
        self._della_finish.argtypes = [
            ctypes.POINTER(_TaskArgs), ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ]  # fmt: skip
        for function in (self._della_add, self._della_finish):
            function.restype = ctypes.c_int
        pointer, int64 = ctypes.c_void_p, ctypes.c_int64
        self._stock_sums = library.fused_stock_sums
        self._stock_sums.argtypes = [
            ctypes.POINTER(pointer), ctypes.c_int32, pointer, ctypes.c_int32, int64, int64, pointer, pointer,
        ]  # fmt: skip
        self._stock_units = library.fused_stock_units
        self._stock_units.argtypes = [
            ctypes.POINTER(pointer), ctypes.c_int32, pointer, ctypes.c_int32, int64, int64, pointer, pointer,
        ]  # fmt: skip
        self._stock_apply = library.fused_stock_apply
        self._stock_apply.argtypes = [
            pointer, ctypes.c_int32, pointer, ctypes.c_int32, pointer, ctypes.c_float, int64, int64,
        ]  # fmt: skip
        self._stock_run = library.fused_stock_run
        self._stock_run.argtypes = [
            ctypes.POINTER(pointer), ctypes.c_int32, pointer, ctypes.c_int32, pointer, ctypes.c_int32,
            ctypes.c_int32, pointer, ctypes.c_double,
        ]  # fmt: skip
        for function in (self._stock_sums, self._stock_units, self._stock_apply, self._stock_run):
            function.restype = ctypes.c_int
        self._geometric_median_run = library.fused_geometric_median_run
        self._geometric_median_run.argtypes = [
            ctypes.POINTER(pointer), ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(ctypes.c_float),
            ctypes.c_float, ctypes.c_int32, pointer, ctypes.c_int32, pointer, ctypes.c_int32,
        ]  # fmt: skip
        self._geometric_median_run.restype = ctypes.c_int
        self._grid_sums = library.fused_grid_sums
        self._grid_sums.argtypes = [
            ctypes.POINTER(pointer), ctypes.c_int32, ctypes.c_int32, pointer, int64, int64, int64,
            ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_float),
        ]  # fmt: skip
        self._grid_sums.restype = ctypes.c_int
        self._largest = library.fused_largest_difference
        self._largest.argtypes = [pointer, pointer, int64, int64, ctypes.POINTER(ctypes.c_float)]
        self._largest.restype = ctypes.c_int
        self._places = library.fused_places
        self._places.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        self._places.restype = ctypes.c_int
        self._pool: ThreadPoolExecutor | None = None
        self._threads = 0
        self._kept_scratch: dict[str, Tensor] = {}
        self._keeping = 0  # scratch_kept bodies running

    @contextmanager
    def scratch_kept(self) -> Iterator[None]:
        """Large keys' scratch tensors kept from key to key while the body runs, and dropped at its
        end: fresh pages cost a page fault each on first touch, ~0.3 s of the two large keys of a
        100-source DELLA export (133 MB of scratch each) on this project's VM. For the export's loop,
        which merges one key at a time."""
        self._keeping += 1
        try:
            yield
        finally:
            self._keeping -= 1
            if not self._keeping:
                self._kept_scratch.clear()

    def _scratch(self, name: str, numel: int, dtype: torch.dtype) -> Tensor:
        """An uninitialised tensor of ``numel`` elements: the one kept under ``name`` inside
        ``scratch_kept`` (grown when too small), else a new one."""
        if not self._keeping:
            return torch.empty(numel, dtype=dtype)
        held = self._kept_scratch.get(name)
        if held is None or held.dtype != dtype or held.numel() < numel:
            self._kept_scratch.pop(name, None)  # its pages go back before the larger one is made
            held = self._kept_scratch[name] = torch.empty(numel, dtype=dtype)
        return held[:numel]

    @staticmethod
    def _takes(models: Sequence[Tensor], base: Tensor, out: Tensor, *, limit: int | None = None) -> bool:
        """The kernel merges these buffers: CPU, contiguous, fp16/fp32, sources of one dtype, at most
        ``limit`` models (None: any number)."""
        tensors = [*models, base, out]
        return (
            0 < len(models) <= (limit or len(models))
            and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
            and base.dtype in _DTYPES
            and out.dtype in _DTYPES
            and all(m.dtype == base.dtype for m in models)
        )

    def merge(
        self,
        parts: Sequence[KeyPart],
        *,
        out: Tensor,
        models: Sequence[Tensor],
        base: Tensor,
        statistics: Tensor,
        rule: FusedRule,
        merged: Tensor | None,
    ) -> bool:
        """out[part] ← C + α·merged for every part (and ``merged`` ← the merged delta, when given);
        ``statistics``: (models, elements) int32 places or draw bits of the block. False, with nothing
        done, for buffers the kernel does not take (then the caller uses torch)."""
        if not self._takes(models, base, out, limit=MAX_MODELS) or statistics.dtype != torch.int32:
            return False
        m = len(models)
        weights = (ctypes.c_float * m)(*rule.weights)
        agree = (ctypes.c_float * m)(*rule.agree_weights)
        template = dict(
            models=m,
            in_dtype=_DTYPES[base.dtype],
            out_dtype=_DTYPES[out.dtype],
            drop=int(rule.drop),
            elect=int(rule.elect),
            weighted=int(any(w != 1.0 for w in rule.weights)),
            unit_agree=int(all(v == 1.0 for v in rule.agree_weights)),
            divide=int(rule.drop and rule.density != 1.0),
            density=rule.density,
            alpha=rule.alpha,
            tiny=torch.finfo(torch.float32).tiny,
            weights=weights,
            agree=agree,
        )
        sizes = (base.element_size(), out.element_size(), 4)
        rows = [(model.data_ptr(), row.data_ptr()) for model, row in zip(models, statistics, strict=True)]
        calls = []
        for part in _pieces(parts):
            start = part.start
            sources = (ctypes.c_void_p * m)(*(address + start * sizes[0] for address, _ in rows))
            stats = (ctypes.c_void_p * m)(*(address + start * sizes[2] for _, address in rows))
            args = _Args(
                n=part.stop - start,
                k=part.limit,
                base=base.data_ptr() + start * sizes[0],
                sources=sources,
                statistics=stats,
                out=out.data_ptr() + start * sizes[1],
                merged_out=None if merged is None else merged.data_ptr() + start * 4,
                **template,
            )
            calls.append((args, sources, stats))  # the arrays live as long as the call
        if any(self._run(calls)):
            raise RuntimeError("the fused CPU kernel refused its arguments")
        return True

    def weighted_mean_into(
        self, out: Tensor, sources: Sequence[Tensor], weights: Sequence[float], divisor: float
    ) -> bool:
        """out ← (Σ x_i·w_i) / divisor, summed left to right in float32 with each product rounded first
        (``weighted_mean``'s loop and ``div_``), rounded once to out's dtype; every source read once.
        False, with nothing done, for tensors the kernel does not take."""
        if not self._takes(sources, sources[0], out) or any(s.numel() != out.numel() for s in sources):
            return False
        m, size, out_size = len(sources), sources[0].element_size(), out.element_size()
        factors = (ctypes.c_float * m)(*weights)
        in_dtype, out_dtype = _DTYPES[sources[0].dtype], _DTYPES[out.dtype]
        calls = []
        for start, stop in _even_pieces(out.numel(), torch.get_num_threads(), m):
            pointers = (ctypes.c_void_p * m)(*(s.data_ptr() + start * size for s in sources))
            target = out.data_ptr() + start * out_size
            calls.append((target, out_dtype, pointers, in_dtype, factors, m, stop - start, divisor))
        if any(self._map(lambda call: self._weighted_mean(*call), calls)):
            raise RuntimeError("the fused CPU kernel refused its arguments")
        return True

    def weighted_mean(
        self, sources: Sequence[Tensor], weights: Sequence[float], divisor: float
    ) -> Tensor | None:
        """``weighted_mean_into`` a new float32 tensor; None for sources the kernel does not take."""
        total = torch.empty(sources[0].shape, dtype=torch.float32)
        return total if self.weighted_mean_into(total, sources, weights, divisor) else None

    def geometric_median_run(
        self,
        out: Tensor,
        models: Sequence[Tensor],
        weights: Sequence[float],
        sizes: Sequence[int],
        max_iter: int,
    ) -> bool:
        """out ← ``geometric_median`` of each key of a run laid back to back in flat views (key j:
        ``sizes[j]`` elements), each from ``weighted_mean``, Weiszfeld's steps with ``grid_norm``'s
        norms, rounded once to out's dtype (``fused_geometric_median_run``: the keys split among the
        threads by elements, one call each). False when the kernel does not take the tensors or some
        key has a difference that is not finite (``out`` partly written; the caller merges key by key
        and the torch path gives its inf or nan)."""
        total = sum(sizes)
        if (
            not self._takes(models, models[0], out)
            or any(t.numel() != total for t in [*models, out])
            or not sizes
            or min(sizes) < 1
        ):
            return False
        if len(sizes) == 1 and total >= _GEOMETRIC_MEDIAN_SPLIT and torch.get_num_threads() > 1:
            return self._geometric_median_key(out, models, weights, max_iter)

        m = len(models)
        offsets = list(itertools.accumulate(sizes, initial=0))
        offset_array = (ctypes.c_int64 * len(offsets))(*offsets)
        pointers = (ctypes.c_void_p * m)(*(t.data_ptr() for t in models))
        weight_array = (ctypes.c_float * m)(*weights)
        long_size = ctypes.sizeof(ctypes.c_int64)

        def keys_of(first: int, last: int) -> int:
            return self._geometric_median_run(
                pointers, m, _DTYPES[models[0].dtype], weight_array, sum(weights), last - first,
                ctypes.addressof(offset_array) + first * long_size, max_iter, out.data_ptr(), _DTYPES[out.dtype],
            )  # fmt: skip

        return self._over_key_groups(offsets, keys_of, m * (2 * max_iter + 1))

    def _geometric_median_key(
        self, out: Tensor, models: Sequence[Tensor], weights: Sequence[float], max_iter: int
    ) -> bool:
        """``fused_geometric_median`` of one large key with every pass split among the threads: the
        distances' grid sums per share (``fused_grid_sums``; integers, so the shares add up to the
        bits of one pass), the weighted means (``weighted_mean_into``); the float32 steps between
        passes as the C loop takes them (numpy float32 scalars)."""
        from automerge.merge.methods.geometric_median import DISTANCE_FLOOR, RELATIVE_TOLERANCE

        one = np.float32(1.0)
        median = self.weighted_mean(models, weights, sum(weights))
        if median is None:
            return False
        updated = torch.empty_like(median)
        guesses: list[int | None] = [None] * len(models)
        moved_guess: list[int | None] = [None]
        size_guess: list[int | None] = [None]
        for _ in range(max_iter):
            distances = self._grid_norms(models, median, guesses)
            if distances is None:
                return False
            coefficients = [
                (one / max(d, np.float32(DISTANCE_FLOOR))) * np.float32(w)
                for d, w in zip(distances, weights, strict=True)
            ]
            coefficient_sum = np.float32(0.0)
            for c in coefficients:
                coefficient_sum = coefficient_sum + c
            self.weighted_mean_into(updated, models, [float(c) for c in coefficients], float(coefficient_sum))
            size = self._grid_norms([updated], None, size_guess)
            largest = self._largest_difference(updated, median)
            moved: list[np.float32] | None = [np.float32(largest)]
            if size is None or not _surely_above(largest, np.float32(RELATIVE_TOLERANCE) * size[0]):
                if largest > 0:  # the norm's grid from its largest term: one pass
                    moved_guess[0] = math.frexp(largest * largest)[1]
                moved = self._grid_norms([updated], median, moved_guess)
            median, updated = updated, median
            if moved is None or size is None:
                return False
            if moved[0] <= np.float32(RELATIVE_TOLERANCE) * size[0]:
                break
        out.copy_(median)
        return True

    def _largest_difference(self, a: Tensor, b: Tensor) -> float:
        """max_j |a_j − b_j| of two float32 tensors over the threads' shares; −1 when some difference
        is not finite."""
        n = a.numel()
        shares = _thread_shares(n, torch.get_num_threads())
        parts = [ctypes.c_float() for _ in shares]
        codes = self._map(
            lambda t: self._largest(a.data_ptr(), b.data_ptr(), *shares[t], ctypes.byref(parts[t])),
            range(len(shares)),
        )
        if any(codes):
            raise RuntimeError("the fused CPU kernel refused its arguments")
        return _largest_of_shares([part.value for part in parts])

    def _grid_norms(
        self, sources: Sequence[Tensor], median: Tensor | None, guesses: list[int | None]
    ) -> list[np.float32] | None:
        """``grid_norm`` of each source − median (None: 0) over the threads' shares of the key, each
        on the grid of ``guesses[i]`` (its largest square's exponent last time; updated), again for
        those whose exponent moved (only those); None when some difference is not finite."""
        n, count = sources[0].numel(), len(sources)
        shares = _thread_shares(n, torch.get_num_threads())
        pointers = (ctypes.c_void_p * count)(*(s.data_ptr() for s in sources))
        dtype, b = _DTYPES[sources[0].dtype], None if median is None else median.data_ptr()

        def sums(which: Sequence[int]) -> tuple[list[int], list[float]]:
            """The grid sum and largest |d| (−1: not finite) of the sources ``which``, each on the
            grid of its guess, over all the shares."""
            k = len(which)
            chosen = (ctypes.c_void_p * k)(*(pointers[i] for i in which))
            exponents = (ctypes.c_int32 * k)(*(guesses[i] or 0 for i in which))
            parts = [((ctypes.c_int64 * k)(), (ctypes.c_float * k)()) for _ in shares]
            codes = self._map(
                lambda t: self._grid_sums(chosen, k, dtype, b, n, *shares[t], exponents, *parts[t]),
                range(len(shares)),
            )
            if any(codes):
                raise RuntimeError("the fused CPU kernel refused its arguments")
            totals = [sum(total[j] for total, _ in parts) for j in range(k)]
            tops = [[top[j] for _, top in parts] for j in range(k)]
            return totals, [_largest_of_shares(each) for each in tops]

        totals, tops = sums(range(count))
        if any(top < 0 for top in tops):
            return None
        moved = []
        for i, top in enumerate(tops):
            exponent = math.frexp(top * top)[1]
            if exponent != guesses[i]:
                guesses[i] = exponent
                moved.append(i)
        if moved:  # summed again on the grid of their largest square
            for i, total in zip(moved, sums(moved)[0], strict=True):
                totals[i] = total
        return [
            np.float32(math.sqrt(total / _grid_scale(n, e))) for total, e in zip(totals, guesses, strict=True)
        ]

    def task_export(self, out: Tensor, models: Sequence[Tensor], base: Tensor, rule: ExportRule) -> bool:
        """out ← C + α·merged of one key (``ExportRule``), as ``TaskArithmetic`` computes it in float32,
        rounded once to out's dtype. False when the kernel does not take the tensors, or some delta or
        kept value is not finite (then ``out`` is partly written, and the caller's torch path runs)."""
        n = out.numel()
        if rule.spread is not None:  # DELLA: model after model over the key
            return n > 0 and self.task_export_run(
                out, models, base, rule, KeyRun((n,), draw_keys=rule.draw_keys)
            )
        if (
            not self._takes(models, base, out)
            or any(t.numel() != n for t in [*models, base])
            or not 0 < n < 1 << 31
        ):
            return False
        m = len(models)
        sources = (ctypes.c_void_p * m)(*(t.data_ptr() for t in models))
        thresholds, cuts = (ctypes.c_int32 * m)(), (ctypes.c_int64 * m)()
        k = rule.keep_count
        if k is not None:
            self._top_k_cuts(models, base, k, thresholds, cuts)
        template = self._task_template(out, models, base, rule, sources, top_k=k is not None) | dict(
            thresholds=thresholds,
            cuts=cuts,
            draw_keys=_uint32_array(rule.draw_keys) if rule.draw_keys else None,
        )
        calls = [
            _TaskArgs(start=start, stop=min(n, start + _PIECE), **template) for start in range(0, n, _PIECE)
        ]
        codes = self._map(lambda args: self._task_export(ctypes.byref(args)), calls)
        if any(code not in (0, _NOT_FINITE) for code in codes):
            raise RuntimeError("the fused CPU kernel refused its arguments")
        return _NOT_FINITE not in codes

    def task_export_run(
        self, out: Tensor, models: Sequence[Tensor], base: Tensor, rule: ExportRule, run: KeyRun
    ) -> bool:
        """``task_export`` of each key of a run laid back to back in flat views (``run``: the keys'
        sizes and their k or draw keys; ``rule``'s own ``keep_count``/``draw_keys`` are unused) in one
        kernel call per thread, the keys split among the threads by elements (DELLA: each key model
        after model, ``fused_della_run``). False when the kernel
        does not take the tensors or some key has a non-finite delta or kept value (``out`` partly
        written; the caller merges the keys one by one)."""
        total = sum(run.sizes)
        m = len(models)
        top_k = run.keep_counts is not None
        if (
            not self._takes(models, base, out)
            or any(t.numel() != total for t in [*models, base, out])
            or not run.sizes
            or min(run.sizes) < 1  # an empty key: merged on its own
            or (top_k and len(run.keep_counts or ()) != len(run.sizes))
            or (not top_k and len(run.draw_keys) != 8 * m * len(run.sizes))
            or (top_k and rule.spread is not None)
        ):
            return False
        offsets = list(itertools.accumulate(run.sizes, initial=0))
        keys = len(run.sizes)
        offset_array = (ctypes.c_int64 * (keys + 1))(*offsets)
        counts = (ctypes.c_int64 * keys)(*run.keep_counts) if top_k else None
        draws = None if top_k else _uint32_array(run.draw_keys)
        pointers = (ctypes.c_void_p * m)(*(t.data_ptr() for t in models))
        args = _TaskArgs(
            start=0, stop=0, **self._task_template(out, models, base, rule, pointers, top_k=top_k)
        )
        long_size, pair_size = ctypes.sizeof(ctypes.c_int64), 2 * m * ctypes.sizeof(ctypes.c_uint32)
        if rule.spread is not None and keys == 1 and total >= _DELLA_SPLIT and torch.get_num_threads() > 1:
            args.draw_keys = ctypes.cast(draws, ctypes.POINTER(ctypes.c_uint32))
            return self._della_key(args, models, base, rule.spread)

        def keys_of(first: int, last: int) -> int:
            if rule.spread is not None:  # DELLA
                return self._della_run(
                    ctypes.byref(args), last - first, ctypes.addressof(offset_array) + first * long_size,
                    ctypes.addressof(draws) + first * pair_size, rule.spread,
                )  # fmt: skip
            return self._task_run(
                ctypes.byref(args), last - first, ctypes.addressof(offset_array) + first * long_size,
                None if counts is None else ctypes.addressof(counts) + first * long_size,
                None if draws is None else ctypes.addressof(draws) + first * pair_size,
                _TOP_K_SAMPLE_FROM,
            )  # fmt: skip

        return self._over_key_groups(offsets, keys_of, m * (2 if rule.spread is None else 8))

    def _della_key(self, args: _TaskArgs, models: Sequence[Tensor], base: Tensor, spread: float) -> bool:
        """DELLA of one large key on the threads: the places of a group of models (``_della_group``
        of them; a radix sort each, ``fused_places``, as many at once as threads), then the group's
        kept values added in model order with the key's elements split among the threads, then the
        election (``fused_della_add``, ``fused_della_finish``); the bits of ``fused_della_run``.
        Scratch: 20 bytes an element for the sums, 4 per model of the group, 16 per thread."""
        n, threads = base.numel(), torch.get_num_threads()
        group = _della_group(n, threads)
        sums = self._scratch("della sums", 5 * n, torch.float32)
        places = [self._scratch(f"della places {slot}", n, torch.int32) for slot in range(group)]
        rows = (ctypes.c_void_p * group)(*(row.data_ptr() for row in places))
        scratch = [self._scratch(f"sort scratch {t}", 4 * n, torch.int32) for t in range(threads)]
        pieces = _thread_shares(n, threads)
        dtype = _DTYPES[base.dtype]

        def sort(slots: Sequence[tuple[int, int]]) -> int:
            codes = 0
            for slot, i in slots:
                codes |= self._places(
                    models[i].data_ptr(), base.data_ptr(), dtype, n, places[slot].data_ptr(),
                    scratch[slots[0][0] % threads].data_ptr(),
                )  # fmt: skip
            return codes

        for first in range(0, len(models), group):
            count = min(group, len(models) - first)
            slots = list(enumerate(range(first, first + count)))
            if any(self._map(sort, [slots[t::threads] for t in range(min(threads, count))])):
                raise RuntimeError("the fused CPU kernel refused its arguments")
            codes = self._map(
                lambda piece, first=first, count=count: self._della_add(
                    ctypes.byref(args), first, count, n, rows, spread, sums.data_ptr(), *piece
                ),
                pieces,
            )
            if any(code == 1 for code in codes):
                raise RuntimeError("the fused CPU kernel refused its arguments")
            if _NOT_FINITE in codes:
                return False
        codes = self._map(
            lambda piece: self._della_finish(ctypes.byref(args), sums.data_ptr(), n, *piece), pieces
        )
        if any(codes):
            raise RuntimeError("the fused CPU kernel refused its arguments")
        return True

    def model_stock_into(
        self,
        out: Tensor,
        models: Sequence[Tensor],
        base: Tensor,
        scales: Callable[[Sequence[float]], Sequence[float]],
        stock_scale: Callable[[float, float], float],
    ) -> bool:
        """out ← C + s·ΣΔi (Model Stock, ``model_stock.py``): pass 1 sums D = ΣΔi and each ‖Δi‖²,
        ``scales`` turns those into the r_i, pass 2 sums ‖Σ Δi·r_i‖² and Σ‖Δi·r_i‖², ``stock_scale``
        turns these into s, and pass 3 writes out; each pass over pieces of ``_PIECE`` elements on the
        threads, the pieces' float64 sums added in piece order (the same bits at any thread count).
        Scratch: one float32 tensor. False, with nothing done, for tensors the kernel does not take
        or a non-finite delta (then the caller's torch path names the source)."""
        n, m = out.numel(), len(models)
        if not self._takes(models, base, out) or any(t.numel() != n for t in [*models, base]) or n == 0:
            return False
        dtype = _DTYPES[base.dtype]
        delta_sum = torch.empty(n, dtype=torch.float32)
        sources = (ctypes.c_void_p * m)(*(t.data_ptr() for t in models))
        pieces = [(start, min(n, start + _PIECE)) for start in range(0, n, _PIECE)]
        squares = [(ctypes.c_double * m)() for _ in pieces]
        norms = [(ctypes.c_double * 2)() for _ in pieces]

        def over_pieces(function: Callable[..., int], *per_piece: Sequence[int]) -> list[int]:
            """``function(sources, m, base, dtype, start, stop, *arrays)`` for each piece, on the threads."""
            return self._map(
                lambda p: function(
                    sources, m, base.data_ptr(), dtype, *pieces[p], *(a[p] for a in per_piece)
                ),
                range(len(pieces)),
            )

        addresses = [ctypes.addressof(piece) for piece in squares]
        codes = over_pieces(self._stock_sums, [delta_sum.data_ptr()] * len(pieces), addresses)
        if any(code not in (0, _NOT_FINITE) for code in codes):
            raise RuntimeError("the fused CPU kernel refused its arguments")
        if _NOT_FINITE in codes:
            return False
        totals = [0.0] * m
        for piece in squares:
            totals = [total + piece[i] for i, total in enumerate(totals)]
        factors = (ctypes.c_float * m)(*scales(totals))
        if any(
            over_pieces(
                self._stock_units,
                [ctypes.addressof(factors)] * len(pieces),
                [ctypes.addressof(x) for x in norms],
            )
        ):
            raise RuntimeError("the fused CPU kernel refused its arguments")
        unit_sum_square = unit_squares = 0.0
        for piece in norms:
            unit_sum_square, unit_squares = unit_sum_square + piece[0], unit_squares + piece[1]
        scale = stock_scale(unit_sum_square, unit_squares)

        def apply(p: int) -> int:
            start, stop = pieces[p]
            return self._stock_apply(
                out.data_ptr(),
                _DTYPES[out.dtype],
                base.data_ptr(),
                dtype,
                delta_sum.data_ptr(),
                scale,
                start,
                stop,
            )

        if any(self._map(apply, range(len(pieces)))):
            raise RuntimeError("the fused CPU kernel refused its arguments")
        return True

    def model_stock_run_into(
        self, out: Tensor, models: Sequence[Tensor], base: Tensor, sizes: Sequence[int], alpha: float
    ) -> bool:
        """``model_stock_into`` of each key of a run laid back to back in flat views (key j: ``sizes[j]``
        elements, each at most ``_PIECE``: one piece, so the same sums), in one kernel call per
        thread, the scales computed in C as ``model_stock`` defines them. False when the kernel does
        not take the tensors or a key has a non-finite delta (``out`` partly written)."""
        m = len(models)
        offsets = list(itertools.accumulate(sizes, initial=0))
        if (
            m < 2
            or not sizes
            or min(sizes) < 1  # an empty key: merged on its own
            or not self._takes(models, base, out)
            or any(t.numel() != offsets[-1] for t in [*models, base, out])
            or max(sizes) > _PIECE
        ):
            return False
        offset_array = (ctypes.c_int64 * len(offsets))(*offsets)
        sources = (ctypes.c_void_p * m)(*(t.data_ptr() for t in models))
        long_size = ctypes.sizeof(ctypes.c_int64)
        dtype, out_dtype = _DTYPES[base.dtype], _DTYPES[out.dtype]

        def keys_of(first: int, last: int) -> int:
            return self._stock_run(
                sources, m, base.data_ptr(), dtype, out.data_ptr(), out_dtype, last - first,
                ctypes.addressof(offset_array) + first * long_size, alpha,
            )  # fmt: skip

        return self._over_key_groups(offsets, keys_of, m * 2)

    def _over_key_groups(
        self, offsets: Sequence[int], keys_of: Callable[[int, int], int], passes: int
    ) -> bool:
        """``keys_of(first, last)`` (one kernel call over keys first … last − 1 of a run) for each
        thread's share of the keys (``_key_groups``, ``passes`` over each element); False when a key
        had a non-finite value."""
        bounds = _key_groups(offsets, passes)
        shares = [(first, last) for first, last in zip(bounds, bounds[1:], strict=False) if first < last]
        codes = self._map(lambda share: keys_of(*share), shares)
        if any(code == 3 for code in codes):
            raise MemoryError("the fused CPU kernel could not allocate its scratch")
        if any(code not in (0, _NOT_FINITE) for code in codes):
            raise RuntimeError("the fused CPU kernel refused its arguments")
        return _NOT_FINITE not in codes

    @staticmethod
    def _task_template(
        out: Tensor,
        models: Sequence[Tensor],
        base: Tensor,
        rule: ExportRule,
        sources: ctypes.Array,
        *,
        top_k: bool,
    ) -> dict[str, object]:
        """``_TaskArgs``'s fields of ``rule`` and the buffers (all but the elements and how each key keeps)."""
        m = len(models)
        return dict(
            models=m,
            in_dtype=_DTYPES[base.dtype],
            out_dtype=_DTYPES[out.dtype],
            keep_mode=_KEEP_TOP_K if top_k else _KEEP_DRAWS,
            elect=int(rule.elect),
            weighted=int(any(w != 1.0 for w in rule.weights)),
            unit_agree=int(all(v == 1.0 for v in rule.agree_weights)),
            divide=int(not top_k and rule.density != 1.0),
            draw_threshold=rule.draw_threshold,
            density=rule.density,
            alpha=rule.alpha,
            tiny=torch.finfo(torch.float32).tiny,
            base=base.data_ptr(),
            sources=sources,
            weights=(ctypes.c_float * m)(*rule.weights),
            agree=(ctypes.c_float * m)(*rule.agree_weights),
            out=out.data_ptr(),
        )

    def _top_k_cuts(
        self, models: Sequence[Tensor], base: Tensor, k: int, thresholds: ctypes.Array, cuts: ctypes.Array
    ) -> None:
        """Each model's top-k threshold and cut (``fused_top_k_cuts``) into the arrays; models in
        groups over the threads for a large key."""
        n, m = base.numel(), len(models)
        if k >= n or k <= 0:  # all or none: t = −1 keeps every |Δ|, t = INT32_MAX none
            for i in range(m):
                thresholds[i], cuts[i] = (-1 if k >= n else (1 << 31) - 1), 0
            return
        groups = max(1, min(m, torch.get_num_threads() if n * m >= _PIECE else 1))
        bounds = [m * g // groups for g in range(groups + 1)]
        int_size, long_size = ctypes.sizeof(ctypes.c_int32), ctypes.sizeof(ctypes.c_int64)

        def group(g: int) -> int:
            first, last = bounds[g], bounds[g + 1]
            pointers = (ctypes.c_void_p * (last - first))(*(t.data_ptr() for t in models[first:last]))
            return self._top_k_cut(
                pointers, last - first, base.data_ptr(), _DTYPES[base.dtype], n, k,
                _TOP_K_GATHER, _TOP_K_SAMPLE_FROM,
                ctypes.addressof(thresholds) + first * int_size, ctypes.addressof(cuts) + first * long_size,
            )  # fmt: skip

        codes = self._map(group, range(groups))
        if any(code == 3 for code in codes):
            raise MemoryError("the fused CPU kernel could not allocate its 8 MiB of top-k scratch")
        if any(codes):
            raise RuntimeError("the fused CPU kernel refused its arguments")

    def places(self, models: Sequence[Tensor], base: Tensor, rows: Sequence[Tensor]) -> bool:
        """rows[i] ← each element's place in the stable descending order of |M_i − C| (float32, ties by
        position), as ``torch.sort(bits.neg(), stable=True)`` orders them (``fused_places``: a radix
        sort); the models in parallel when their scratch (16 bytes an element each) stays small.
        False, with nothing done, for tensors the kernel does not take."""
        n = base.numel()
        if (
            not self._takes(models, base, base)
            or any(m.numel() != n for m in models)
            or any(r.dtype != torch.int32 or not r.is_contiguous() or r.numel() != n for r in rows)
            or n >= 1 << 31
        ):
            return False
        dtype = _DTYPES[base.dtype]

        def one(i: int) -> int:
            scratch = torch.empty(4 * n, dtype=torch.int32)
            return self._places(
                models[i].data_ptr(), base.data_ptr(), dtype, n, rows[i].data_ptr(), scratch.data_ptr()
            )

        indices = range(len(models))
        codes = self._map(one, indices) if 16 * n <= _PLACES_PARALLEL_BYTES else [one(i) for i in indices]
        if any(codes):
            raise RuntimeError("the fused CPU kernel refused its arguments")
        return True

    def _run(self, calls: list[tuple[_Args, object, object]]) -> list[int]:
        return self._map(lambda call: self._function(ctypes.byref(call[0])), calls)

    def _map(self, function: Callable[[T], int], calls: Sequence[T]) -> list[int]:
        """``function`` over ``calls``, on torch's number of threads (ctypes releases the GIL)."""
        threads = torch.get_num_threads()
        if threads <= 1 or len(calls) <= 1:
            return [function(call) for call in calls]
        if self._pool is None or self._threads != threads:
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="automerge-fused")
            self._threads = threads
        return list(self._pool.map(function, calls))


def _uint32_array(packed: bytes) -> ctypes.Array:
    """The kernel's uint32 array of little-endian uint32 ``packed`` (the kernel runs on x86 only)."""
    return (ctypes.c_uint32 * (len(packed) // 4)).from_buffer_copy(packed)


def _even_pieces(n: int, threads: int, passes: int) -> list[tuple[int, int]]:
    """Elements 0 … n − 1 cut into pieces of at most ~``_PIECE``, as many as a multiple of the
    threads and of even size (each starting at a multiple of 8), so that no thread waits on
    another's longer piece; one piece below ``_GROUP_WORK`` element-passes (``passes`` over each
    element)."""
    count = 1 if n * passes < _GROUP_WORK else threads * -(-n // (_PIECE * threads))
    return _thread_shares(n, count)


def _thread_shares(n: int, threads: int) -> list[tuple[int, int]]:
    """Elements 0 … n − 1 cut into one share per thread, each starting at a multiple of 8."""
    shares = [(n * t // threads // 8 * 8, n * (t + 1) // threads // 8 * 8) for t in range(threads)]
    shares[-1] = (shares[-1][0], n)
    return shares


def _largest_of_shares(tops: Sequence[float]) -> float:
    """The largest |d| of a key from its threads' shares' (−1: some share found a non-finite d)."""
    return -1.0 if min(tops) < 0 else max(tops)


def _surely_above(largest: float, bound: np.float32) -> bool:
    """The C file's ``surely_above``: ``grid_norm`` of a d whose largest |d_j| is ``largest`` is above
    ``bound`` for sure (it is at least largest·(1 − 3e-7)), so the stopping test needs no norm."""
    return largest >= 0 and largest * (1.0 - _LARGEST_TERM_SLACK) > float(bound)


def _grid_scale(n: int, exponent: int) -> float:
    """1/g of ``grid_norm``'s grid (the C file's ``grid_scale``)."""
    steps = min(52, 62 - (n - 1).bit_length()) - exponent
    return math.ldexp(1.0, max(-1000, min(1000, steps)))


def _della_group(n: int, threads: int) -> int:
    """How many models' DELLA places are held at once for a key of ``n`` elements: up to
    ``_DELLA_GROUP`` (each added over a tile of the sums while it is in the cache, so the sums go
    through memory once a group, not once a model) in at most ``_DELLA_GROUP_BYTES``, and at least as
    many as threads (their sorts run side by side); ``fused_della_run`` sizes its groups alike."""
    return max(threads, min(_DELLA_GROUP, _DELLA_GROUP_BYTES // (4 * n)))


def _key_groups(offsets: Sequence[int], passes: int) -> list[int]:
    """The first key of each thread's share of a run of keys (``offsets``: each key's first element,
    then the end), split by elements; one share when the run is small: below ``_GROUP_WORK``
    element-passes (``passes``: how many times the method reads each element of the run, e.g. its
    models × its steps). The last entry is the end."""
    keys, total = len(offsets) - 1, offsets[-1]
    groups = max(1, min(keys, torch.get_num_threads() if total * passes >= _GROUP_WORK else 1))
    bounds = [0]
    for g in range(1, groups):
        target = total * g // groups
        bounds.append(next((j for j in range(bounds[-1], keys) if offsets[j] >= target), keys))
    bounds.append(keys)
    return bounds


def _pieces(parts: Sequence[KeyPart]) -> list[KeyPart]:
    """Each part cut into pieces of at most ``_PIECE`` elements (a multiple of 8)."""
    return [
        KeyPart(start, min(start + _PIECE, part.stop), part.limit)
        for part in parts
        for start in range(part.start, part.stop, _PIECE)
    ]


@functools.cache
def fused_kernel() -> FusedKernel | None:
    """The kernel, compiled on first use; None where it cannot run here (see the module doc)."""
    if os.environ.get(DISABLE_VARIABLE, "1") == "0":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64") or os.name != "posix":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):  # before loading AVX2 code
        return None
    try:
        library = ctypes.CDLL(str(_compiled()))
    except (OSError, subprocess.SubprocessError) as error:
        _log.info("no fused CPU kernel (the torch path merges task arithmetic): %s", error)
        return None
    if not library.fused_supported():
        return None
    library.fused_args_size.restype = ctypes.c_int
    library.task_args_size.restype = ctypes.c_int
    if library.fused_args_size() != ctypes.sizeof(_Args) or library.task_args_size() != ctypes.sizeof(
        _TaskArgs
    ):
        raise AssertionError("_Args / _TaskArgs do not match the C file's fused_args / task_args")
    return FusedKernel(library)


def _compiled() -> Path:
    """The shared library of ``SOURCE``, built into the cache folder when missing (atomic rename)."""
    compiler = os.environ.get("CC") or "cc"
    found = shutil.which(compiler)
    if found is None:
        raise OSError(f"no C compiler '{compiler}' on PATH")
    digest = hashlib.sha256(SOURCE.read_bytes() + found.encode() + " ".join(_FLAGS).encode()).hexdigest()
    target = cache_dir() / "kernels" / f"fused_cpu-{digest[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as folder:
        built = Path(folder) / target.name
        done = subprocess.run(
            [found, *_FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise OSError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(built, target)
    return target
