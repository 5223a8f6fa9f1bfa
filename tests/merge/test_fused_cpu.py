"""The one-pass CPU kernel of the live task-arithmetic merge (``merge/_fused_cpu``): the bits of the
torch passes it replaces (``_sparse_live``), on data made to find the corners (signed zeros, kept values
that cancel, equal magnitudes, non-unit weights, vector tails), (the live engine against the export: ``test_sparse_live``)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from automerge.merge._fused_cpu import (
    _GROUP_WORK,
    DISABLE_VARIABLE,
    _even_pieces,
    _key_groups,
    fused_kernel,
)
from automerge.merge._sparse_live import LiveTaskArithmetic
from automerge.merge.methods import METHODS


@pytest.fixture(scope="module")
def kernel_needed() -> None:
    """The kernel builds wherever the CI machine is (x86-64, cc); elsewhere its tests skip."""
    if fused_kernel() is None:
        if os.environ.get("CI") and os.environ.get(DISABLE_VARIABLE) != "0":
            pytest.fail("the fused CPU kernel did not build on CI (is a C compiler installed?)")
        pytest.skip("no fused CPU kernel here (no C compiler, no AVX2/F16C, or not x86-64)")


@dataclass(frozen=True)
class _Span:
    key: str
    offset: int
    numel: int


@pytest.fixture(autouse=True)
def _threads_restored() -> Iterator[None]:
    """Tests here set torch's number of threads; each gives back the number it started with."""
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def _sources(
    models: int, numel: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Base and models with the corners: ±0, exact copies of the base (Δ = ±0), values that cancel
    between models, equal magnitudes (ties in the order), a few large values."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=generator).to(dtype)
    base[::7] = 0.0
    base[1::11] = -0.0
    rows = []
    for i in range(models):
        delta = torch.randn(numel, generator=generator) * 0.1
        delta[i::5] = 0.0  # Δ = 0: the model equals the base there
        delta[3::13] = 0.25 * (-1) ** i  # equal magnitudes, opposite signs
        delta[4::17] = 8.0 * (-1) ** (i // 2)
        model = (base.float() + delta).to(dtype)
        model[5::19] = -0.0
        rows.append(model)
    return base, rows


def _spans(numel: int) -> list[_Span]:
    """Keys of odd sizes (vector tails), one larger than a kernel call's piece."""
    sizes = [1, 7, 8, 9, 100, 333, 4099]
    sizes.append(numel - sum(sizes))
    offsets = [0, *itertools.accumulate(sizes)][:-1]
    return [_Span(f"key{i}", o, n) for i, (o, n) in enumerate(zip(offsets, sizes, strict=True))]


CASES = [  # method, models, in dtype, out dtype, weights
    ("ties", 1, torch.float16, torch.float16, None),
    ("ties", 2, torch.float16, torch.float16, None),
    ("ties", 3, torch.float32, torch.float32, (0.7, 1.0, 1.3)),
    ("ties", 5, torch.float16, torch.float32, (1e-3, 0.5, 2.0, 1.0, 0.3)),
    ("dare", 2, torch.float16, torch.float16, None),
    ("dare", 3, torch.float32, torch.float16, (0.9, 1.1, 0.4)),
    ("dare_ties", 3, torch.float16, torch.float16, (0.5, 1.0, 1.5)),
]


@pytest.mark.parametrize(("method", "models", "source_dtype", "out_dtype", "weights"), CASES)
@pytest.mark.usefixtures("kernel_needed")
def test_the_kernel_gives_the_torch_passes_bits(
    method: str,
    models: int,
    source_dtype: torch.dtype,
    out_dtype: torch.dtype,
    weights: tuple[float, ...] | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("automerge.merge._fused_cpu._PIECE", 1 << 11)  # large keys in several calls
    numel = 12_000
    base, rows = _sources(models, numel, source_dtype, seed=models)
    spans = _spans(numel)
    outputs = {}
    for fused in (True, False):
        live = LiveTaskArithmetic(
            METHODS.get(method),
            seed=3,
            compute_dtype=torch.float32,
            device=torch.device("cpu"),
            keep_on=torch.device("cpu"),
            fused=fused,
        )
        assert (live.fused is not None) == fused
        results = []
        for density, alpha in [(0.45, 0.8), (0.9, -1.7), (1.0, 0.3), (0.0, 1.0), (0.2, 0.6), (0.2, 1.1)]:
            out = torch.empty(numel, dtype=out_dtype)
            params = {"alpha": alpha, "density": density}
            done = live.merge_block(
                "B", spans, out, rows, base, params=params, weights=weights, source_magnitude=9.0
            )
            assert done
            results.append(out)
        outputs[fused] = results
    for fast, slow in zip(outputs[True], outputs[False], strict=True):
        assert torch.equal(
            fast.view(torch.int16 if out_dtype == torch.float16 else torch.int32),
            slow.view(torch.int16 if out_dtype == torch.float16 else torch.int32),
        )


def test_without_a_compiler_avx2_or_with_the_switch_off_the_torch_path_merges(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("AUTOMERGE_CACHE_DIR", str(tmp_path))
    fused_kernel.cache_clear()
    try:
        assert fused_kernel() is None
        monkeypatch.delenv("CC")
        monkeypatch.setenv(DISABLE_VARIABLE, "0")
        fused_kernel.cache_clear()
        assert fused_kernel() is None
        monkeypatch.delenv(DISABLE_VARIABLE)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")  # no AVX2
        fused_kernel.cache_clear()
        assert fused_kernel() is None
    finally:
        fused_kernel.cache_clear()


@pytest.mark.parametrize(("dtype", "models"), [(torch.float16, 4), (torch.float32, 4), (torch.float16, 11)])
@pytest.mark.usefixtures("kernel_needed")
def test_the_weighted_average_gives_torchs_bits(
    dtype: torch.dtype, models: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``weighted_mean``: (Σ x_i·w_i) / Σ w_i with each product rounded before it is added, as
    ``weighted_mean``'s torch loop; over several calls (pieces) and a vector tail; 5 sources read
    interleaved, 12 block by block."""
    from automerge.merge.methods.average import weighted_mean

    monkeypatch.setattr("automerge.merge._fused_cpu._PIECE", 1 << 10)
    kernel = fused_kernel()
    assert kernel is not None
    base, rows = _sources(models, 5_003, dtype, seed=9)
    sources, weights = (
        [base, *rows],
        [0.3, -1.7, 1e-3, 2.0, 0.7, 1.1, 0.2, 3.0, 0.5, 0.9, 1.3, 0.4][: models + 1],
    )
    fast = kernel.weighted_mean(sources, weights, sum(weights))
    slow = weighted_mean([s.float() for s in sources], weights, method="average")  # torch's loop
    assert fast is not None and torch.equal(fast.view(torch.int32), slow.view(torch.int32))
    assert kernel.weighted_mean([base, rows[0][::2]], [1.0, 1.0], 2.0) is None  # torch's turn
    assert kernel.weighted_mean([base, rows[0].double()], [1.0, 1.0], 2.0) is None


EXPORT_CASES = [  # method, models, source dtype, out dtype, weights
    ("ties", 1, torch.float16, torch.float16, None),
    ("ties", 3, torch.float16, torch.float16, None),
    ("ties", 3, torch.float32, torch.float32, (0.7, 0.0, 1.3)),
    ("ties", 70, torch.float16, torch.float16, None),  # more models than the live kernel takes
    ("dare", 2, torch.float16, torch.float16, None),
    ("dare", 4, torch.float32, torch.float16, (0.9, 1.1, 0.4, 2.5)),
    ("dare_ties", 3, torch.float16, torch.float32, (0.5, 1.0, 1.5)),
    ("dare_ties", 66, torch.float16, torch.float16, None),
    ("della", 1, torch.float16, torch.float16, None),
    ("della", 4, torch.float32, torch.float16, (0.9, 1.1, 0.4, 2.5)),
    ("della", 66, torch.float16, torch.float32, None),
]


SELECT_CASES = [  # numel, gather limit, sampled select from
    (1, 1 << 20, 1 << 16),
    (9, 1 << 20, 1 << 16),
    (120, 1 << 20, 1 << 16),  # a quickselect over the held bits
    (250, 1 << 20, 1 << 16),  # 11-bit digits over a key of a few hundred
    (4_099, 1 << 20, 1 << 16),  # 11-bit digits, one histogram; the gathered by quickselect
    (20_000, 1 << 20, 1 << 16),  # the first 11-bit digit counted into four copies
    (70_001, 1 << 20, 1 << 16),  # the select bracketed by a sample: one pass
    (70_001, 1 << 20, 1 << 31),  # 12-bit radix digits over the data (four copies) and 3 calls
    (70_001, 40, 1 << 16),  # a gather limit of 40: no sample, further passes over the data
]
"""Key sizes and select limits that take each path of the top-k cut (DELLA sorts: its default only)."""


@pytest.mark.parametrize(
    ("method", "models", "source_dtype", "out_dtype", "weights", "numel", "gather", "sample_from"),
    [
        (*case, *select)
        for case in EXPORT_CASES
        for select in SELECT_CASES
        if case[0] != "della" or select[1:] == (1 << 20, 1 << 16)
    ],
)
@pytest.mark.usefixtures("kernel_needed")
def test_the_export_kernel_gives_the_methods_bits(
    method: str,
    models: int,
    source_dtype: torch.dtype,
    out_dtype: torch.dtype,
    weights: tuple[float, ...] | None,
    numel: int,
    gather: int,
    sample_from: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``TaskArithmetic.stored_into`` (the export's ``task_export``: each model's top-k cut by a radix
    select, then one pass) against the method itself on the upcast sources, rounded to the output's
    dtype: equal bits. Densities put the k-th largest |Δ| among equal magnitudes (8.0 at 1/17 of the
    elements, 0.25, and the Δ = 0 of copied elements), so the cut among ties is exercised."""
    from automerge.merge.methods import noise_for

    monkeypatch.setattr("automerge.merge._fused_cpu._PIECE", 1 << 15)
    monkeypatch.setattr("automerge.merge._fused_cpu._TOP_K_GATHER", gather)
    monkeypatch.setattr("automerge.merge._fused_cpu._TOP_K_SAMPLE_FROM", sample_from)
    merge = METHODS.get(method)
    base, rows = _sources(models, numel, source_dtype, seed=models + numel)
    densities = [0.03, 0.45, 0.9, 1.0, 0.0, 0.2]
    if numel > 140:  # a run of 40 equal |Δ| side by side, the k-th largest in its middle
        base[100:140], rows[0][100:140] = 1.0, 1.5
        densities.append(int((rows[0].float() - base.float()).abs().gt(0.5).sum() + 20) / numel)
    w = None if weights is None else list(weights)
    noise = {"noise": noise_for("model.diffusion_model.x", 11)} if merge.random else {}
    for density, alpha in itertools.product(densities, [0.8, -1.7]):
        params = {"alpha": alpha, "density": density, **noise}
        fast = torch.empty(numel, dtype=out_dtype)
        assert merge.stored_into is not None
        assert merge.stored_into(fast, rows, base, weights=w, **params)
        slow = merge.fn([r.float() for r in rows], base.float(), weights=w, **params).to(out_dtype)
        bits = torch.int16 if out_dtype == torch.float16 else torch.int32
        assert torch.equal(fast.view(bits), slow.view(bits)), (density, alpha)


RUN_SIZES = [1, 7, 8, 9, 120, 250, 333, 4_099, 1, 70_001, 2, 300]  # the tails, the quickselect, a sampled cut


@pytest.mark.parametrize(("method", "models", "source_dtype", "out_dtype", "weights"), EXPORT_CASES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.usefixtures("kernel_needed")
def test_a_run_of_keys_merged_in_one_call_gives_each_keys_bits(
    method: str,
    models: int,
    source_dtype: torch.dtype,
    out_dtype: torch.dtype,
    weights: tuple[float, ...] | None,
    threads: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``stored_run_into`` (``task_export_run``: keys laid back to back, each key's cuts or draws and
    merge in one kernel call per thread) against ``stored_into`` key by key, each key with its own
    noise: equal bits, at densities that keep all, none and some (so k = n and k = 0 keys too), the
    keys split between two threads."""
    from automerge.merge.methods import noise_for

    monkeypatch.setattr("automerge.merge._fused_cpu._PIECE", 1 << 15)  # a run this small is split too
    merge = METHODS.get(method)
    assert merge.stored_run_into is not None and merge.stored_into is not None
    total = sum(RUN_SIZES)
    base, rows = _sources(models, total, source_dtype, seed=models)
    names = [f"model.diffusion_model.k{j}" for j in range(len(RUN_SIZES))]
    noises = [noise_for(name, 3) for name in names] if merge.random else None
    w = None if weights is None else list(weights)
    torch.set_num_threads(threads)
    for density, alpha in [(0.45, 0.8), (1.0, 1.0), (0.0, 1.0), (0.03, -1.7)]:
        run = torch.full((total,), float("nan"), dtype=out_dtype)
        assert merge.stored_run_into(
            run, rows, base, sizes=RUN_SIZES, noises=noises, weights=w, alpha=alpha, density=density
        )
        start = 0
        for j, size in enumerate(RUN_SIZES):
            part = slice(start, start + size)
            one = torch.empty(size, dtype=out_dtype)
            extra = {} if noises is None else {"noise": noises[j]}
            keys_rows = [r[part] for r in rows]
            assert merge.stored_into(
                one, keys_rows, base[part], weights=w, alpha=alpha, density=density, **extra
            )
            bits = torch.int16 if out_dtype == torch.float16 else torch.int32
            assert torch.equal(run[part].view(bits), one.view(bits)), (density, alpha, j)
            start += size


@pytest.mark.parametrize(("numel", "models"), [(4_099, 5), (70_001, 5), (70_001, 11)])
@pytest.mark.usefixtures("kernel_needed")
def test_della_of_a_large_key_on_two_threads_gives_the_methods_bits(
    numel: int, models: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DELLA of a key past ``_DELLA_SPLIT`` (``_della_key``: a group of up to 8 models sorted two at
    once, the group's kept values added tile by tile with the elements split between the threads)
    against the method itself: equal bits, for 5 models (one group, an odd one out of the pairs) and
    11 (a full group and a short one), weights, and a NaN declined."""
    from automerge.merge.methods import noise_for

    monkeypatch.setattr("automerge.merge._fused_cpu._DELLA_SPLIT", 1_000)
    merge = METHODS.get("della")
    assert merge.stored_into is not None
    base, rows = _sources(models, numel, torch.float16, seed=numel)
    params = {"noise": noise_for("model.diffusion_model.k", 4), "density": 0.4, "epsilon": 0.3}
    torch.set_num_threads(2)
    for weights in (None, [0.5, 1.0, 2.0, 0.25, 1.5, 0.75][:models] + [1.25] * (models - 6)):
        fast = torch.empty(numel, dtype=torch.float16)
        assert merge.stored_into(fast, rows, base, weights=weights, alpha=0.9, **params)
        slow = merge.fn([r.float() for r in rows], base.float(), weights=weights, alpha=0.9, **params)
        assert torch.equal(fast.view(torch.int16), slow.half().view(torch.int16)), weights
    rows[3][numel - 2] = float("nan")
    assert not merge.stored_into(torch.empty(numel, dtype=torch.float16), rows, base, **params)


@pytest.mark.usefixtures("kernel_needed")
def test_della_scratch_kept_from_key_to_key_gives_the_same_bits_and_goes_at_the_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Inside ``scratch_kept`` (the export's loop), a large DELLA key's scratch is kept for the next
    key (reused when large enough, replaced when not) and dropped when the body ends; a smaller key
    after a larger one, read from the larger one's buffers, gives the method's bits."""
    from automerge.merge.methods import noise_for

    monkeypatch.setattr("automerge.merge._fused_cpu._DELLA_SPLIT", 1_000)
    kernel = fused_kernel()
    assert kernel is not None
    merge = METHODS.get("della")
    assert merge.stored_into is not None
    params = {"noise": noise_for("model.diffusion_model.k", 4), "density": 0.4, "epsilon": 0.3}
    torch.set_num_threads(2)
    with kernel.scratch_kept():
        for numel in (9_001, 5_003):
            base, rows = _sources(3, numel, torch.float16, seed=numel)
            fast = torch.empty(numel, dtype=torch.float16)
            assert merge.stored_into(fast, rows, base, alpha=0.9, **params)
            slow = merge.fn([r.float() for r in rows], base.float(), alpha=0.9, **params)
            assert torch.equal(fast.view(torch.int16), slow.half().view(torch.int16)), numel
            assert kernel._kept_scratch["della sums"].numel() == 5 * 9_001
    assert not kernel._kept_scratch


@pytest.mark.usefixtures("kernel_needed")
def test_a_run_with_a_non_finite_delta_or_an_empty_key_is_declined() -> None:
    """A NaN in one model of one key of the run, or a key of no elements: the run call declines (the
    export then merges its keys one by one, and the general path names the source)."""
    merge = METHODS.get("ties")
    assert merge.stored_run_into is not None
    total = sum(RUN_SIZES)
    base, rows = _sources(3, total, torch.float16, seed=2)
    out = torch.empty(total, dtype=torch.float16)
    assert merge.stored_run_into(out, rows, base, sizes=RUN_SIZES, density=0.5)
    for name in ("ties", "model_stock"):  # an empty key in a run: declined, not refused with an error
        method = METHODS.get(name)
        assert method.stored_run_into is not None
        assert not method.stored_run_into(out, rows, base, sizes=[*RUN_SIZES[:-1], 0, RUN_SIZES[-1]])
    rows[1][total - 3] = float("nan")
    assert not merge.stored_run_into(out, rows, base, sizes=RUN_SIZES, density=0.5)
    assert not merge.stored_run_into(out, rows, base, sizes=RUN_SIZES[:-1], density=0.5)  # sizes ≠ total


def _sample_gaps(numel: int, runs: int = 512, run: int = 32) -> torch.Tensor:
    """The positions outside the sampled select's runs (``SAMPLE_RUNS``, ``SAMPLE_RUN`` in the C file)."""
    outside = torch.ones(numel, dtype=torch.bool)
    for r in range(runs):
        start = r * (numel - run) // (runs - 1)
        outside[start : start + run] = False
    return outside


@pytest.mark.parametrize("misleading", ["ties_past_the_gather_limit", "large_deltas_between_the_samples"])
@pytest.mark.usefixtures("kernel_needed")
def test_a_misleading_sample_falls_back_to_the_radix_select(
    misleading: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sampled select gives up, and the radix select over the data gives the method's bits, where
    its bracket holds more elements than the gather limit (60 % of |Δ| equal, t among them) or misses
    t (every large |Δ| between the sampled runs, so the sample ranks t far too low)."""
    monkeypatch.setattr("automerge.merge._fused_cpu._TOP_K_GATHER", 20_000)
    monkeypatch.setattr("automerge.merge._fused_cpu._TOP_K_SAMPLE_FROM", 1 << 16)
    numel = 70_001
    base, rows = _sources(3, numel, torch.float16, seed=5)
    generator = torch.Generator().manual_seed(6)
    for i, row in enumerate(rows):
        if misleading == "ties_past_the_gather_limit":
            row[torch.rand(numel, generator=generator) < 0.6] = base[0] + 0.5
            base[:] = base[0]
        else:
            delta = torch.randn(numel, generator=generator) * 1e-3
            delta[_sample_gaps(numel)] *= 1000.0
            rows[i] = (base.float() + delta).to(torch.float16)
    merge = METHODS.get("ties")
    for density in [0.3, 0.55, 0.7]:
        fast = torch.empty(numel, dtype=torch.float16)
        assert merge.stored_into is not None and merge.stored_into(fast, rows, base, density=density)
        slow = merge.fn([r.float() for r in rows], base.float(), density=density).to(torch.float16)
        assert torch.equal(fast.view(torch.int16), slow.view(torch.int16)), density


@pytest.mark.parametrize("method", ["ties", "dare", "della"])
@pytest.mark.usefixtures("kernel_needed")
def test_the_export_kernel_leaves_non_finite_sources_and_odd_weights_to_torch(method: str) -> None:
    """A NaN or Inf in any model (kept or not): the kernel declines, and the general path (which names
    the damaged source) runs; so it does for a sign election with a weight < 0 or in (0, tiny)."""
    from automerge.merge.methods import noise_for

    merge = METHODS.get(method)
    assert merge.stored_into is not None
    base, rows = _sources(3, 4_099, torch.float16, seed=5)
    extra = {"noise": noise_for("k", 1)} if merge.random else {}
    out = torch.empty(4_099, dtype=torch.float16)
    assert merge.stored_into(out, rows, base, alpha=1.0, density=0.3, **extra)
    for bad in (float("nan"), float("inf")):
        damaged = [rows[0], rows[1].clone(), rows[2]]
        damaged[1][4_000] = bad
        assert not merge.stored_into(out, damaged, base, alpha=1.0, density=0.3, **extra)
    for weights in ([1.0, -0.5, 1.0], [1.0, 1e-45, 1.0]):  # the sum (dare) takes them, the election not
        taken = merge.stored_into(out, rows, base, alpha=1.0, density=0.3, weights=weights, **extra)
        assert taken is not merge.fn.elect
        if taken:
            slow = merge.fn(
                [r.float() for r in rows], base.float(), weights=weights, alpha=1.0, density=0.3, **extra
            )
            assert torch.equal(out.view(torch.int16), slow.half().view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("numel", [1, 9, 4_099, 70_001])
@pytest.mark.usefixtures("kernel_needed")
def test_the_kernel_places_are_torchs_stable_descending_order(dtype: torch.dtype, numel: int) -> None:
    """``places`` (the live engine's top-k statistic, by a radix sort in C): each element's position in
    the stable descending order of |Δ| that ``magnitude_order`` gives, on data full of equal magnitudes
    (fp16 steps, Δ = ±0, ±0.25)."""
    from automerge.merge.methods._task_core import magnitude_order

    kernel = fused_kernel()
    assert kernel is not None
    base, rows = _sources(3, numel, dtype, seed=numel)
    out = torch.full((3, numel), -1, dtype=torch.int32)
    assert kernel.places(rows, base, list(out))
    for row, model in zip(out, rows, strict=True):
        expected = torch.empty(numel, dtype=torch.int32)
        expected[magnitude_order((model.float() - base.float()).abs())] = torch.arange(
            numel, dtype=torch.int32
        )
        assert torch.equal(row, expected)


@pytest.mark.parametrize(
    "shared",
    ["low_bits", "all_but_one_bit", "every_bit", "high_bits", "a_middle_digit", "no_bits_few_elements"],
)
@pytest.mark.usefixtures("kernel_needed")
def test_the_kernel_places_sort_only_the_bits_where_magnitudes_differ(shared: str) -> None:
    """The radix sort's digits cover only the bits where some |Δ| differ, and a digit every |Δ| shares
    is skipped: the places are still the stable descending order, where the low bits are zero for
    every element (few significant bits, as fp16 sources give), all but one bit are shared, every |Δ|
    is equal, the high bits are shared (one exponent), only bits 0–3 and 23–25 differ (three 9-bit
    digits, the middle one shared), or 28 differ over 200 elements (four 7-bit digits)."""
    from automerge.merge.methods._task_core import magnitude_order

    kernel = fused_kernel()
    assert kernel is not None
    numel = 200 if shared == "no_bits_few_elements" else 5_000
    generator = torch.Generator().manual_seed(3)
    base = torch.ones(numel)
    steps = torch.randint(0, 300, (numel,), generator=generator).float()
    exponents = torch.randint(100, 108, (numel,), generator=generator, dtype=torch.int32)
    low_bits = torch.randint(0, 16, (numel,), generator=generator, dtype=torch.int32)
    delta = {
        "low_bits": steps * 2.0**-10,  # a few significant bits: bits 0–10 of |Δ| are all zero
        "all_but_one_bit": torch.where(steps < 150, 0.5, 0.75),  # only bit 22 differs
        "every_bit": torch.full((numel,), 0.25),
        "high_bits": 1.0 + torch.rand(numel, generator=generator) * 0.4,  # one exponent
        "a_middle_digit": ((exponents << 23) | low_bits).view(torch.float32),
        "no_bits_few_elements": torch.randn(numel, generator=generator) * 1e-30,
    }[shared]
    if shared in ("a_middle_digit", "no_bits_few_elements"):  # |Δ| exact: from zero
        base = torch.zeros(numel)
    model = base + delta * torch.where(steps % 2 == 0, 1.0, -1.0)
    out = torch.full((1, numel), -1, dtype=torch.int32)
    assert kernel.places([model], base, list(out))
    expected = torch.empty(numel, dtype=torch.int32)
    expected[magnitude_order((model - base).abs())] = torch.arange(numel, dtype=torch.int32)
    assert torch.equal(out[0], expected)


@pytest.mark.parametrize(
    ("models", "numel", "source_dtype", "out_dtype"),
    [
        (2, 1, torch.float16, torch.float16),
        (3, 7, torch.float32, torch.float32),
        (3, 4_099, torch.float16, torch.float32),
        (5, 70_001, torch.float16, torch.float16),  # several pieces (the piece made small below)
        (70, 3_001, torch.float16, torch.float16),
    ],
)
@pytest.mark.usefixtures("kernel_needed")
def test_model_stock_through_the_kernel_gives_the_methods_bits_at_any_thread_count(
    models: int,
    numel: int,
    source_dtype: torch.dtype,
    out_dtype: torch.dtype,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``model_stock``'s kernel (three passes over pieces, its float64 sums in its own order) against
    the method on the upcast sources: equal bits, with one thread and with two, and for a model that
    equals the base (Δ = 0, unit 0) and one that cancels another."""
    monkeypatch.setattr("automerge.merge._fused_cpu._PIECE", 1 << 14)
    merge = METHODS.get("model_stock")
    assert merge.stored_into is not None
    base, rows = _sources(models, numel, source_dtype, seed=models)
    if models >= 5:  # two cancel, one is the base: the other models' deltas remain
        rows[1] = base.clone()
        rows[2] = (2 * base.float() - rows[0].float()).to(source_dtype)
    for alpha in [1.0, 0.37, 2.0]:
        expected = merge.fn([r.float() for r in rows], base.float(), alpha=alpha).to(out_dtype)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = torch.full((numel,), float("nan"), dtype=out_dtype)
            assert merge.stored_into(out, rows, base, alpha=alpha)
            bits = torch.int16 if out_dtype == torch.float16 else torch.int32
            assert torch.equal(out.view(bits), expected.view(bits)), (alpha, threads)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.usefixtures("kernel_needed")
def test_model_stock_of_a_run_of_keys_in_one_call_gives_each_keys_bits(
    threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``stored_run_into`` of Model Stock (each key's passes and scales in C) against ``stored_into``
    key by key (its scales in Python): equal bits, keys split between two threads; a key of a
    model equal to the base and a key larger than a piece is declined."""
    monkeypatch.setattr("automerge.merge._fused_cpu._PIECE", 1 << 15)
    merge = METHODS.get("model_stock")
    assert merge.stored_run_into is not None and merge.stored_into is not None
    sizes = [size for size in RUN_SIZES if size <= 1 << 15]
    total = sum(sizes)
    base, rows = _sources(5, total, torch.float16, seed=8)
    rows[3][:1] = base[:1]  # the first key: model 3's delta is 0
    torch.set_num_threads(threads)
    for alpha in [1.0, 0.37]:
        run = torch.full((total,), float("nan"), dtype=torch.float16)
        assert merge.stored_run_into(run, rows, base, sizes=sizes, alpha=alpha)
        start = 0
        for size in sizes:
            part = slice(start, start + size)
            one = torch.empty(size, dtype=torch.float16)
            assert merge.stored_into(one, [r[part] for r in rows], base[part], alpha=alpha)
            assert torch.equal(run[part].view(torch.int16), one.view(torch.int16)), (alpha, size)
            start += size
    big = torch.empty(sum(RUN_SIZES), dtype=torch.float16)
    big_base, big_rows = _sources(3, sum(RUN_SIZES), torch.float16, seed=9)
    assert not merge.stored_run_into(big, big_rows, big_base, sizes=RUN_SIZES)  # 70,001 > a piece


@pytest.mark.usefixtures("kernel_needed")
def test_model_stock_kernel_declines_a_non_finite_delta() -> None:
    merge = METHODS.get("model_stock")
    assert merge.stored_into is not None
    base, rows = _sources(3, 4_099, torch.float16, seed=1)
    out = torch.empty(4_099, dtype=torch.float16)
    for bad in (float("nan"), float("inf")):
        damaged = [rows[0], rows[1].clone(), rows[2]]
        damaged[1][4_098] = bad  # in the scalar tail
        assert not merge.stored_into(out, damaged, base)
        damaged[1][4_098], damaged[1][5] = rows[1][4_098], bad  # in the vector part
        assert not merge.stored_into(out, damaged, base)


@pytest.mark.parametrize(
    ("models", "numel", "source_dtype", "out_dtype", "weights", "max_iter"),
    [
        (1, 50, torch.float16, torch.float16, None, 5),
        (3, 1_001, torch.float16, torch.float16, None, 100),  # runs to the stopping test
        (7, 70_001, torch.float16, torch.float32, (0.5, 1.0, 2.0, 0.0, 1.0, 3.0, 1.7), 8),
        (12, 9, torch.float32, torch.float16, None, 100),  # more than 8 models: the mean block by block
    ],
)
@pytest.mark.usefixtures("kernel_needed")
def test_the_geometric_median_kernel_gives_the_methods_bits(
    models: int,
    numel: int,
    source_dtype: torch.dtype,
    out_dtype: torch.dtype,
    weights: tuple[float, ...] | None,
    max_iter: int,
) -> None:
    """``geometric_median``'s ``stored_into`` (Weiszfeld's loop in C with ``grid_norm``'s norms)
    against the method itself on the upcast sources, rounded to the output's dtype: equal bits, with
    a model equal to another on a stretch and a weight of 0; a NaN in a model is declined."""
    merge = METHODS.get("geometric_median")
    assert merge.stored_into is not None
    _, rows = _sources(models, numel, source_dtype, seed=models + numel)
    if models > 1 and numel > 40:
        rows[0][10:40] = rows[1][10:40]
    w = None if weights is None else list(weights)
    fast = torch.empty(numel, dtype=out_dtype)
    assert merge.stored_into(fast, rows, None, weights=w, max_iter=max_iter)
    slow = merge.fn([r.float() for r in rows], None, weights=w, max_iter=max_iter).to(out_dtype)
    bits = torch.int16 if out_dtype == torch.float16 else torch.int32
    assert torch.equal(fast.view(bits), slow.view(bits))
    rows[-1][numel // 2] = float("nan")
    untouched = fast.clone()
    assert not merge.stored_into(fast, rows, None, weights=w, max_iter=max_iter)
    assert torch.equal(fast.view(bits), untouched.view(bits))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.usefixtures("kernel_needed")
def test_the_geometric_median_of_a_run_gives_each_keys_bits(threads: int) -> None:
    """``geometric_median``'s ``stored_run_into`` (keys laid back to back, split among the threads,
    one kernel call each) against the method on each key alone: equal bits; a NaN in one key declines
    the run (the export then merges key by key)."""
    merge = METHODS.get("geometric_median")
    assert merge.stored_run_into is not None
    total = sum(RUN_SIZES)
    _, rows = _sources(5, total, torch.float16, seed=9)
    weights = [1.0, 0.5, 2.0, 1.0, 3.0]
    torch.set_num_threads(threads)
    out = torch.empty(total, dtype=torch.float16)
    assert merge.stored_run_into(out, rows, None, sizes=RUN_SIZES, max_iter=20, weights=weights)
    offset = 0
    for size in RUN_SIZES:
        part = slice(offset, offset + size)
        slow = merge.fn([r[part].float() for r in rows], None, max_iter=20, weights=weights).half()
        assert torch.equal(out[part].view(torch.int16), slow.view(torch.int16)), size
        offset += size
    rows[2][total - 5] = float("nan")
    assert not merge.stored_run_into(out, rows, None, sizes=RUN_SIZES, max_iter=20, weights=weights)


@pytest.mark.parametrize(("numel", "models"), [(4_099, 6), (70_001, 6), (70_001, 11)])
@pytest.mark.usefixtures("kernel_needed")
def test_the_geometric_median_of_a_large_key_on_two_threads_gives_the_methods_bits(
    numel: int, models: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key past ``_GEOMETRIC_MEDIAN_SPLIT`` (``_geometric_median_key``: every pass split between the
    threads, the grid sums added from the shares, summed again only for the norms whose grid moved)
    against the method itself: equal bits, with weights and till the stopping test, with more models
    than one group of the weighted mean's block loop; a NaN declined with ``out`` untouched."""
    monkeypatch.setattr("automerge.merge._fused_cpu._GEOMETRIC_MEDIAN_SPLIT", 1_000)
    merge = METHODS.get("geometric_median")
    assert merge.stored_into is not None
    _, rows = _sources(models, numel, torch.float16, seed=numel + models)
    torch.set_num_threads(2)
    weighted = [0.5, 1.0, 2.0, 0.0, 1.5, 1.0, 0.25, 3.0, 1.0, 0.5, 2.5][:models]
    for weights, max_iter in ((None, 100), (weighted, 6)):
        fast = torch.empty(numel, dtype=torch.float16)
        assert merge.stored_into(fast, rows, None, weights=weights, max_iter=max_iter)
        slow = merge.fn([r.float() for r in rows], None, weights=weights, max_iter=max_iter)
        assert torch.equal(fast.view(torch.int16), slow.half().view(torch.int16)), weights
    rows[4][numel - 3] = float("nan")
    untouched = fast.clone()
    assert not merge.stored_into(fast, rows, None, max_iter=5)
    assert torch.equal(fast.view(torch.int16), untouched.view(torch.int16))


@pytest.mark.usefixtures("kernel_needed")
def test_the_kernels_grid_sums_round_half_way_squares_to_even_as_torch_does() -> None:
    """``fused_grid_sums`` rounds each d² to the grid by adding 2^52 grid steps: squares exactly half
    way between two steps (in the vector part and in the scalar tail) go to the even one, as
    ``torch.round`` in ``grid_norm`` does, and the sum is the torch path's integer."""
    import ctypes

    kernel = fused_kernel()
    assert kernel is not None
    n = 1_027  # b = min(52, 62 − ⌈log2 n⌉) = 51; the largest d = 1.5: d² = 2.25, exponent 2, 1/g = 2^49
    odd = torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0]) * 2.0**-25  # d²/g = k²/2: half way
    x = torch.zeros(n, dtype=torch.float32)
    x[0] = 1.5
    x[1:8], x[16:23], x[1_024:] = odd, -odd, odd[1:4]  # both signs; the last three in the scalar tail
    squares = x.double().square() * 2.0**49
    assert int((squares.frac() == 0.5).sum()) == 17
    expected = int(torch.round(squares).to(torch.int64).sum())
    assert expected == 2**49 * 9 // 4 + 2 * (0 + 4 + 12 + 24 + 40 + 60 + 84) + (4 + 12 + 24)
    pointers = (ctypes.c_void_p * 1)(x.data_ptr())
    sums, tops = (ctypes.c_int64 * 1)(), (ctypes.c_float * 1)()
    assert kernel._grid_sums(pointers, 1, 1, None, n, 0, n, (ctypes.c_int32 * 1)(2), sums, tops) == 0
    assert sums[0] == expected
    assert tops[0] == 1.5


def test_runs_are_split_among_the_threads_by_their_work_not_their_size() -> None:
    """``_key_groups``: a run of few elements read many times (geometric median of many models) is
    split among the threads; the same run read twice is not; the shares cover every key once."""
    torch.set_num_threads(2)
    offsets = [0, 3_000, 6_000, 9_000, 12_000]
    assert _key_groups(offsets, 2) == [0, 4]
    split = _key_groups(offsets, _GROUP_WORK // 12_000 + 1)
    assert split[0] == 0 and split[-1] == 4 and len(split) == 3


def test_even_pieces_give_each_thread_the_same_share() -> None:
    """``_even_pieces``: a number of pieces that is a multiple of the threads, of sizes within 8
    elements of each other, covering 0 … n − 1 in order; one piece for a small amount of work."""
    n = (1 << 20) + 500_000
    pieces = _even_pieces(n, 2, 100)
    assert len(pieces) % 2 == 0
    assert pieces[0][0] == 0 and pieces[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))
    sizes = [stop - start for start, stop in pieces]
    assert max(sizes) - min(sizes) <= 8
    assert _even_pieces(1_000, 2, 2) == [(0, 1_000)]


@pytest.mark.usefixtures("kernel_needed")
def test_the_stopping_tests_shortcut_is_never_wrong_and_the_largest_difference_is_exact() -> None:
    """``_surely_above``: whenever the largest |d_j| alone says ``grid_norm(d)`` is above a bound, it
    is (a d of one large term and many small ones, bounds within 4e-5 of its largest term and of
    its norm); ``_largest_difference`` is torch's max |a − b| over the threads' shares, −1 with a NaN."""
    from automerge.merge._fused_cpu import _surely_above
    from automerge.merge.methods.geometric_median import grid_norm

    kernel = fused_kernel()
    assert kernel is not None
    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(3)
    for numel, small in ((9, 0.0), (4_099, 1e-4), (70_001, 1e-3)):
        a = torch.randn(numel, generator=generator)
        b = a - torch.randn(numel, generator=generator) * small
        b[numel // 3] = a[numel // 3] - 0.75  # the largest term
        d = a - b
        largest = kernel._largest_difference(a, b)
        assert largest == float(d.abs().max())
        norm = float(grid_norm(d))
        checked = 0
        for near in (norm, largest):
            for steps in range(-40, 41):
                bound = np.float32(near) * np.float32(1.0 + steps * 1e-6)
                if _surely_above(largest, bound):
                    assert norm > bound, (numel, steps)
                    checked += 1
        assert checked > 0
        b[numel - 1] = float("nan")
        assert kernel._largest_difference(a, b) == -1.0
