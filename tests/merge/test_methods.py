"""Merge methods: formulas against direct float64 computations, invariants, and a contract suite
that runs against every registered method (a new method is tested the moment it is registered)."""

from __future__ import annotations

import hashlib
import inspect
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Annotated

import numpy as np
import pytest
import scipy.optimize
import torch
from torch import Tensor

from automerge.errors import MergeError
from automerge.merge.methods import (
    METHODS,
    LazySources,
    MergeMethod,
    Noise,
    Param,
    ParamSpec,
    all_finite,
    check_finite,
    max_magnitude,
    merge_into,
    merge_tensor,
    noise_for,
    register_method,
)
from automerge.merge.methods._task_core import (
    RADIX_SELECT_NUMEL,
    counter_uniform,
    kth_largest,
    magnitude_bits,
    magnitude_order,
    noise_key,
    noise_keys,
)
from automerge.merge.methods.task_arithmetic import TaskArithmetic, _top_k


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _noise(seed: int = 0, key: str = "k") -> Noise:
    return Noise(seed=seed, key=key)


def _run(
    name: str,
    models: Sequence[Tensor],
    base: Tensor | None,
    *,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    **params: float,
) -> Tensor:
    method = METHODS.get(name)
    extras: dict[str, object] = {"noise": _noise(seed)} if method.random else {}
    if weights is not None:
        extras["weights"] = weights
    return method.fn(list(models), base, **(method.defaults() | params), **extras)


def _f64(*tensors: Tensor) -> list[Tensor]:
    return [t.double() for t in tensors]


# ---------------------------------------------------------------------------------------------
# Formulas against direct computations
# ---------------------------------------------------------------------------------------------


def test_weighted_sum_is_linear_interpolation_toward_b() -> None:
    a, b = _randn(6, 5, seed=1), _randn(6, 5, seed=2)
    a64, b64 = _f64(a, b)
    result = _run("weighted_sum", [a, b], None, alpha=0.3)
    torch.testing.assert_close(result.double(), 0.7 * a64 + 0.3 * b64, rtol=0, atol=1e-6)


def test_slerp_matches_direct_spherical_formula() -> None:
    a, b = _randn(4, 9, seed=3), _randn(4, 9, seed=4)
    a64, b64 = _f64(a, b)
    na, nb = a64.norm(), b64.norm()
    omega = torch.arccos(torch.sum(a64 * b64) / (na * nb))
    alpha = 0.35
    expected = (
        (torch.sin((1 - alpha) * omega) * a64 / na + torch.sin(alpha * omega) * b64 / nb)
        / torch.sin(omega)
        * ((1 - alpha) * na + alpha * nb)
    )
    torch.testing.assert_close(
        _run("slerp", [a, b], None, alpha=alpha).double(), expected, rtol=1e-5, atol=1e-6
    )


def test_slerp_halfway_between_orthogonal_unit_vectors_is_on_the_circle() -> None:
    result = _run("slerp", [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], None, alpha=0.5)
    torch.testing.assert_close(result, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0])),  # colinear
        (torch.zeros(3), torch.tensor([1.0, -2.0, 0.5])),  # zero norm
        (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, -2.0, -3.0])),  # antipodal
    ],
)
def test_slerp_falls_back_to_lerp_for_colinear_or_zero_tensors(a: Tensor, b: Tensor) -> None:
    result = _run("slerp", [a, b], None, alpha=0.25)
    torch.testing.assert_close(result, 0.75 * a + 0.25 * b)


def test_add_difference_adds_alpha_times_b_minus_c() -> None:
    a, b, c = _randn(5, 5, seed=5), _randn(5, 5, seed=6), _randn(5, 5, seed=7)
    a64, b64, c64 = _f64(a, b, c)
    result = _run("add_difference", [a, b], c, alpha=1.7)
    torch.testing.assert_close(result.double(), a64 + 1.7 * (b64 - c64), rtol=0, atol=1e-5)


def test_train_difference_matches_supermerger_formula() -> None:
    a, b, c = _randn(40, seed=8), _randn(40, seed=9), _randn(40, seed=10)
    b[:5] = a[:5]  # |B−A| = 0: nothing added
    b[5:10] = c[5:10]  # B − C = 0: nothing added
    a[10:15], b[10:15], c[10:15] = 1.0, 1.0, 1.0  # denominator 0
    a64, b64, c64 = _f64(a, b, c)
    dist = (b64 - a64).abs()
    expected = a64 + 1.8 * 0.6 * (b64 - c64) * dist / (dist + (b64 - c64).abs())
    expected[10:15] = 1.0
    result = _run("train_difference", [a, b], c, alpha=0.6)
    torch.testing.assert_close(result.double(), expected, rtol=0, atol=1e-5)
    assert torch.equal(result[:15], a[:15])


def test_ties_keeps_top_magnitudes_elects_sign_and_averages_agreeing_deltas() -> None:
    c = torch.full((4,), 10.0)
    delta_1 = torch.tensor([3.0, -1.0, 2.0, 0.5])
    delta_2 = torch.tensor([-1.0, -2.0, 1.5, 0.1])
    # density 0.5 keeps 2 of 4: [3, 0, 2, 0] and [0, -2, 1.5, 0]
    result = _run("ties", [c + delta_1, c + delta_2], c, alpha=0.5, density=0.5)
    torch.testing.assert_close(result, c + 0.5 * torch.tensor([3.0, -2.0, 1.75, 0.0]))


def test_ties_drops_the_deltas_that_disagree_with_the_elected_sign() -> None:
    c = torch.zeros(4)
    delta_1 = torch.tensor([3.0, -1.0, 2.0, 0.5])
    delta_2 = torch.tensor([-1.0, -2.0, 1.5, 0.1])
    result = _run("ties", [delta_1, delta_2], c, alpha=1.0, density=1.0)
    torch.testing.assert_close(result, torch.tensor([3.0, -1.5, 1.75, 0.3]))


def test_ties_gives_zero_where_the_kept_deltas_cancel_exactly() -> None:
    c = torch.zeros(2)
    result = _run("ties", [torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 2.0])], c, density=1.0)
    torch.testing.assert_close(result, torch.tensor([0.0, 2.0]))


def test_ties_breaks_magnitude_ties_by_position() -> None:
    c = torch.zeros(4)
    one = torch.ones(4)
    result = _run("ties", [one, one], c, alpha=1.0, density=0.5)
    assert torch.equal(result, torch.tensor([1.0, 1.0, 0.0, 0.0]))


def _draws(noise: Noise, shape: torch.Size, model_index: int) -> Tensor:
    """The documented draws of one model: counter_uniform keyed by (seed, key, model index)."""
    keys = noise_key(noise.seed, noise.key, model_index)
    return counter_uniform(keys, 0, math.prod(shape)).view(shape)


def _masks(noise: Noise, keep: Tensor | float, shape: torch.Size, count: int) -> list[Tensor]:
    """Model i is kept where its draw u < p."""
    return [_draws(noise, shape, i) < keep for i in range(count)]


def _disjoint_mean_reference(deltas: list[Tensor]) -> Tensor:
    stacked = torch.stack(deltas).double()
    elected = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == elected) & (stacked != 0)
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


def test_dare_matches_direct_drop_and_rescale_by_one_over_density() -> None:
    a, b, c = _randn(30, seed=11), _randn(30, seed=12), _randn(30, seed=13)
    masks = _masks(_noise(5), 0.3, c.shape, 2)
    expected = c.double() + 0.8 * sum(m * (x - c).double() / 0.3 for m, x in zip(masks, [a, b], strict=True))
    result = _run("dare", [a, b], c, seed=5, alpha=0.8, density=0.3)
    torch.testing.assert_close(result.double(), expected, rtol=0, atol=1e-5)


def _top_k_by_stable_sort(delta: Tensor, density: float) -> Tensor:
    """The definition: rank |Δ| with a stable descending sort and keep the first ⌊density·n + ½⌋."""
    flat = delta.flatten()
    k = min(flat.numel(), int(density * flat.numel() + 0.5))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.argsort(flat.abs(), descending=True, stable=True)[:k]] = True
    return torch.where(mask, flat, 0.0).view_as(delta)


@pytest.mark.parametrize("density", [0.0, 0.013, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ties_selection_equals_the_stable_sort_definition_with_many_equal_magnitudes(
    density: float, dtype: torch.dtype
) -> None:
    """Values rounded to few levels make hundreds of |Δ| equal at the threshold, of both signs."""
    delta = (_randn(37, 29, 3, seed=8) * 4).round().to(dtype) / 8
    keep, probability = _top_k(delta, 0, density=density)
    assert probability == 1.0
    kept = delta if keep is None else torch.where(keep, delta, 0.0)
    assert torch.equal(kept, _top_k_by_stable_sort(delta, density))


def test_dare_ties_matches_direct_drop_then_sign_election() -> None:
    a, b, c = _randn(30, seed=14), _randn(30, seed=15), _randn(30, seed=16)
    masks = _masks(_noise(6), 0.6, c.shape, 2)
    dropped = [m * (x - c) / 0.6 for m, x in zip(masks, [a, b], strict=True)]
    expected = c.double() + 1.2 * _disjoint_mean_reference(dropped)
    result = _run("dare_ties", [a, b], c, seed=6, alpha=1.2, density=0.6)
    torch.testing.assert_close(result.double(), expected, rtol=0, atol=1e-5)


def test_dare_is_unbiased_and_keeps_about_density_of_the_elements() -> None:
    c = torch.zeros(20_000)
    result = _run("dare", [torch.ones(20_000), torch.ones(20_000)], c, seed=1, alpha=1.0, density=0.25)
    assert set(result.unique().tolist()) <= {0.0, 4.0, 8.0}  # survivors rescaled by exactly 1/0.25
    assert abs(result.mean().item() - 2.0) < 0.1  # E = Σ Δi = 2
    assert abs((result == 0).float().mean().item() - 0.75**2) < 0.02


def _della_keep_reference(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """Ascending rank of |Δ|, equal |Δ| mirrored from top-k's order: the earlier element ranks higher."""
    magnitude = delta.abs().flatten().numpy()
    n = magnitude.size
    rank = np.empty(n)
    rank[np.argsort(-magnitude, kind="stable")] = np.arange(n, 0, -1)
    spread = min(epsilon, 2 * density, 2 * (1 - density))
    keep = density + spread * (rank / n - (n + 1) / (2 * n))
    return torch.from_numpy(keep).reshape(delta.shape)


def test_della_matches_direct_rank_dependent_drop_rescale_and_sign_election() -> None:
    a, b, c = _randn(5, 8, seed=17), _randn(5, 8, seed=18), _randn(5, 8, seed=19)
    deltas = [a - c, b - c]
    dropped = []
    for i, delta in enumerate(deltas):
        keep = _della_keep_reference(delta, 0.4, 0.3)
        survives = _draws(_noise(7), delta.shape, i) < keep
        dropped.append(torch.where(survives, delta.double() / keep, 0.0))
    expected = c.double() + 0.9 * _disjoint_mean_reference(dropped)
    result = _run("della", [a, b], c, seed=7, alpha=0.9, density=0.4, epsilon=0.3)
    torch.testing.assert_close(result.double(), expected, rtol=0, atol=1e-5)


def test_della_keeps_large_magnitudes_more_often_than_small_ones() -> None:
    c = torch.zeros(20_000)
    delta = torch.linspace(0.01, 1.0, 20_000)
    result = _run("della", [delta], c, seed=2, alpha=1.0, density=0.5, epsilon=0.8)
    kept = result != 0  # p_keep averages 0.2 over the smallest quarter, 0.8 over the largest
    assert kept[:5_000].float().mean() < 0.3 < 0.7 < kept[-5_000:].float().mean()


def test_della_caps_epsilon_so_the_kept_fraction_stays_density() -> None:
    c = torch.zeros(20_000)
    result = _run("della", [torch.ones(20_000)], c, seed=3, alpha=1.0, density=0.1, epsilon=1.0)
    assert torch.isfinite(result).all()
    assert abs((result != 0).float().mean().item() - 0.1) < 0.015


def test_model_stock_matches_direct_formula_for_three_models() -> None:
    c = _randn(7, 3, seed=20)
    models = [c + _randn(7, 3, seed=21 + i) for i in range(3)]
    deltas = [(m - c).double().flatten() for m in models]
    cosines = [
        torch.dot(deltas[i], deltas[j]) / (deltas[i].norm() * deltas[j].norm())
        for i in range(3)
        for j in range(i + 1, 3)
    ]
    cos = sum(cosines) / 3
    t = 3 * cos / (1 + 2 * cos)
    expected = c.double() + 0.7 * t * torch.stack(deltas).mean(0).reshape(c.shape)
    result = _run("model_stock", models, c, alpha=0.7)
    torch.testing.assert_close(result.double(), expected, rtol=0, atol=1e-5)


def test_model_stock_with_identical_deltas_gives_base_plus_delta() -> None:
    c, delta = _randn(12, seed=24), _randn(12, seed=25)
    result = _run("model_stock", [c + delta, c + delta, c + delta], c)
    torch.testing.assert_close(result, c + delta)


@pytest.mark.parametrize("second", [torch.tensor([0.0, 1.0]), torch.tensor([-1.0, 0.0])])
def test_model_stock_gives_base_for_orthogonal_or_cancelling_deltas(second: Tensor) -> None:
    c = torch.tensor([5.0, 5.0])
    result = _run("model_stock", [c + torch.tensor([1.0, 0.0]), c + second], c)
    torch.testing.assert_close(result, c)


def test_geometric_median_minimises_the_sum_of_distances() -> None:
    points = [_randn(3, seed=26 + i, dtype=torch.float64) for i in range(5)]
    points_np = torch.stack(points).numpy()

    def total_distance(m: np.ndarray) -> float:
        return float(np.linalg.norm(points_np - m, axis=1).sum())

    optimum = scipy.optimize.minimize(total_distance, points_np.mean(0), method="Nelder-Mead", tol=1e-12).x
    result = _run("geometric_median", [p.float() for p in points], None)
    np.testing.assert_allclose(result.double().numpy(), optimum, atol=1e-4)


def test_a_weiszfeld_step_keeps_the_models_precision() -> None:
    """Σ ci·Mi / Σ ci with ci = wi / ‖Mi − m‖, every sum in the models' dtype (float64 here: a
    float32 sum of the coefficients would be off by ~1e-8)."""
    from automerge.merge.methods.geometric_median import _weiszfeld_step

    models = [_randn(7, seed=s, dtype=torch.float64) for s in (1, 2, 3)]
    weights = [1.0, 0.5, 2.0]
    median = _randn(7, seed=4, dtype=torch.float64)
    arrays = [m.numpy() for m in models]
    c = [w / np.linalg.norm(a - median.numpy()) for a, w in zip(arrays, weights, strict=True)]
    expected = sum(ci * a for ci, a in zip(c, arrays, strict=True)) / sum(c)
    result = _weiszfeld_step(models, weights, median)
    assert result.dtype == torch.float64
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-14, atol=0)


def test_geometric_median_of_identical_models_is_that_model() -> None:
    model = _randn(4, 4, seed=31)
    result = _run("geometric_median", [model, model.clone(), model.clone()], None)
    torch.testing.assert_close(result, model, rtol=1e-6, atol=1e-7)


def test_geometric_median_ignores_a_single_outlier() -> None:
    model, outlier = _randn(10, seed=32), _randn(10, seed=33) * 100
    result = _run("geometric_median", [model, model.clone(), outlier], None)
    torch.testing.assert_close(result, model, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Invariants
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["weighted_sum", "slerp", "add_difference", "train_difference"])
def test_alpha_zero_gives_a_bit_exactly(name: str) -> None:
    a, b, c = _randn(33, 7, seed=40), _randn(33, 7, seed=41), _randn(33, 7, seed=42)
    assert torch.equal(_run(name, [a, b], c, alpha=0.0), a)


@pytest.mark.parametrize("name", ["weighted_sum", "slerp"])
def test_alpha_one_gives_b_bit_exactly(name: str) -> None:
    a, b = _randn(33, 7, seed=43), _randn(33, 7, seed=44)
    assert torch.equal(_run(name, [a, b], None, alpha=1.0), b)


@pytest.mark.parametrize("name", ["ties", "dare", "dare_ties", "della"])
def test_density_one_with_one_model_gives_base_plus_alpha_delta(name: str) -> None:
    a, c = _randn(50, seed=45), _randn(50, seed=46)
    torch.testing.assert_close(_run(name, [a], c, alpha=1.3, density=1.0), c + 1.3 * (a - c))


@pytest.mark.parametrize("name", ["ties", "dare", "dare_ties", "della"])
def test_density_zero_gives_the_base(name: str) -> None:
    a, b, c = _randn(50, seed=47), _randn(50, seed=48), _randn(50, seed=49)
    assert torch.equal(_run(name, [a, b], c, density=0.0), c)


@pytest.mark.parametrize("name", [name for name, method in METHODS.items() if method.random])
def test_random_methods_repeat_with_equal_seeds_and_differ_with_different_seeds(name: str) -> None:
    a, b, c = _randn(200, seed=50), _randn(200, seed=51), _randn(200, seed=52)
    first = _run(name, [a, b], c, seed=3)
    assert torch.equal(first, _run(name, [a, b], c, seed=3))
    assert not torch.equal(first, _run(name, [a, b], c, seed=4))


# ---------------------------------------------------------------------------------------------
# Contract suite: every registered method
# ---------------------------------------------------------------------------------------------

ALL = METHODS.names()
SHAPES = [(), (1,), (7,), (4, 3, 3, 3)]


def _sources(
    method: MergeMethod, shape: tuple[int, ...], *, dtype: torch.dtype = torch.float32, count: int = 0
):
    count = count or method.min_models
    models = [_randn(*shape, seed=60 + i, dtype=dtype) for i in range(count)]
    base = _randn(*shape, seed=59, dtype=dtype) if method.needs_base else None
    return models, base


def _call(
    method: MergeMethod, models: list[Tensor], base: Tensor | None, params: dict[str, float] | None = None
):
    randomness = {"noise": _noise(9)} if method.random else {}
    return method.fn(models, base, **(params or method.defaults()), **randomness)


@pytest.mark.parametrize("name", ALL)
def test_method_metadata_is_complete_and_defaults_are_in_range(name: str) -> None:
    method = METHODS.get(name)
    assert method.name == name
    assert method.formula.strip() and "\n" not in method.formula
    assert 1 <= method.min_models and (method.max_models is None or method.max_models >= method.min_models)
    for spec in method.params:
        assert spec.default is not None and spec.check(spec.default) is None, spec
    assert set(method.defaults()) == set(method.param_names())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", ALL)
def test_method_keeps_shape_and_dtype_and_is_finite(
    name: str, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    method = METHODS.get(name)
    models, base = _sources(method, shape, dtype=dtype)
    result = _call(method, models, base)
    assert result.shape == torch.Size(shape) and result.dtype == dtype
    assert torch.isfinite(result).all()


@pytest.mark.parametrize("name", ALL)
def test_method_is_deterministic(name: str) -> None:
    method = METHODS.get(name)
    models, base = _sources(method, (5, 4, 3, 3))
    assert torch.equal(_call(method, models, base), _call(method, models, base))


@pytest.mark.parametrize("name", ALL)
def test_method_neither_modifies_nor_returns_its_inputs(name: str) -> None:
    method = METHODS.get(name)
    models, base = _sources(method, (6, 5))
    before = [t.clone() for t in [*models, *([base] if base is not None else [])]]
    for params in [method.defaults(), *_range_ends(method)]:
        result = _call(method, models, base, params)
        for source in [*models, base]:
            assert source is None or result.data_ptr() != source.data_ptr()
    after = [*models, *([base] if base is not None else [])]
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))


def _range_ends(method: MergeMethod) -> list[dict[str, float]]:
    """Every parameter at each finite end of its range, the others at their defaults."""
    ends = []
    for spec in method.params:
        for value in (spec.low, spec.high):
            if value is not None:
                ends.append(method.defaults() | {spec.name: value})
    return ends


@pytest.mark.parametrize("name", ALL)
def test_method_is_finite_at_every_end_of_its_parameter_ranges(name: str) -> None:
    method = METHODS.get(name)
    models, base = _sources(method, (8, 3))
    for params in _range_ends(method):
        assert torch.isfinite(_call(method, models, base, params)).all(), params


@pytest.mark.parametrize("name", [name for name, method in METHODS.items() if method.max_models is None])
def test_any_number_methods_accept_four_models(name: str) -> None:
    method = METHODS.get(name)
    models, base = _sources(method, (3, 3), count=4)
    assert _call(method, models, base).shape == (3, 3)


@pytest.mark.parametrize("name", [name for name, method in METHODS.items() if not method.random])
def test_deterministic_methods_take_no_noise_and_merge_tensor_passes_none(name: str) -> None:
    method = METHODS.get(name)
    assert "noise" not in inspect.signature(method.fn).parameters
    models, base = _sources(method, (6,))
    with_noise = merge_tensor(method, models, base, key="k", params=method.defaults(), noise=_noise(1))
    assert torch.equal(with_noise, _call(method, models, base))


@pytest.mark.parametrize("name", [name for name, method in METHODS.items() if method.random])
def test_random_methods_refuse_to_run_without_noise(name: str) -> None:
    method = METHODS.get(name)
    models, base = _sources(method, (6,))
    with pytest.raises(ValueError, match=f"merge method '{name}' is random and needs a Noise"):
        method.fn(models, base, noise=None, **method.defaults())


@pytest.mark.parametrize("name", ALL)
def test_merge_tensor_upcasts_half_precision_sources(name: str) -> None:
    method = METHODS.get(name)
    models, base = _sources(method, (4, 4))
    half = [m.half() for m in models]
    half_base = None if base is None else base.half()
    noise = _noise(9) if method.random else None
    result = merge_tensor(method, half, half_base, key="k", params=method.defaults(), noise=noise)
    expected = _call(method, [m.float() for m in half], None if half_base is None else half_base.float())
    assert result.dtype == torch.float32
    assert torch.equal(result, expected)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunk_numel", [1, 7, 64, None])
def test_merge_into_equals_merge_tensor_cast_to_the_output_dtype(
    name: str, dtype: torch.dtype, chunk_numel: int | None
) -> None:
    """Every fast path (fused ``inplace``, ``compute_into``, chunks of any size) gives the same bits."""
    method = METHODS.get(name)
    models, base = _sources(method, (5, 3, 3, 3), dtype=dtype)
    params = method.defaults() | ({"alpha": 0.37} if "alpha" in method.param_names() else {})
    expected = merge_tensor(method, models, base, key="k", params=params, noise=_noise(9)).to(dtype)
    out = torch.full_like(expected, math.nan)
    merge_into(out, method, models, base, key="k", params=params, noise=_noise(9), chunk_numel=chunk_numel)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("name", [n for n in ALL if METHODS.get(n).compute_into or METHODS.get(n).inplace])
@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0, 1.7])
def test_fast_paths_equal_the_method_function_bit_for_bit(name: str, alpha: float) -> None:
    method = METHODS.get(name)
    alpha = min(alpha, method.params[0].high or alpha)
    models, base = _sources(method, (4099,), dtype=torch.float16)
    upcast = [m.float() for m in models]
    expected = method.fn(upcast, None if base is None else base.float(), alpha=alpha)
    if method.compute_into is not None:
        out = torch.empty(4099)
        method.compute_into(out, models, base, alpha=alpha)
        assert torch.equal(out, expected)
    if method.inplace is not None:
        out16 = torch.empty(4099, dtype=torch.float16)
        method.inplace(out16, models, base, alpha=alpha)
        assert torch.equal(out16, expected.half())


@pytest.mark.parametrize("name", [n for n in ALL if METHODS.get(n).stored_into is not None])
@pytest.mark.parametrize(
    ("source_dtype", "out_dtype"), [(torch.float16, torch.float16), (torch.float32, torch.float16)]
)
def test_stored_into_equals_the_method_function_bit_for_bit(
    name: str, source_dtype: torch.dtype, out_dtype: torch.dtype
) -> None:
    """``stored_into`` (the export's merge from the stored views) gives the function's bits rounded
    once to the output's dtype, with weights and parameters off their defaults; where the fused
    kernel is built it takes these ordinary sources."""
    from automerge.merge._fused_cpu import fused_kernel

    method = METHODS.get(name)
    assert method.stored_into is not None
    models, base = _sources(method, (4099,), dtype=source_dtype, count=4)
    params = method.defaults() | {spec.name: (spec.default or 0.0) * 0.8 + 0.1 for spec in method.params}
    extras: dict[str, object] = {"noise": _noise(9)} if method.random else {}
    if method.weighted:
        extras["weights"] = [0.5, 1.0, 1.5, 0.7]
    out = torch.empty(4099, dtype=out_dtype)
    taken = method.stored_into(out, models, base, **params, **extras)
    assert taken == (fused_kernel() is not None)
    if taken:
        upcast = [m.float() for m in models]
        expected = method.fn(upcast, None if base is None else base.float(), **params, **extras)
        assert torch.equal(out, expected.to(out_dtype))


@pytest.mark.parametrize("name", [n for n in ALL if METHODS.get(n).growth is not None])
def test_growth_bounds_every_result_element(name: str) -> None:
    """|result| ≤ growth·max|source| at the top of every parameter range, on heavy-tailed sources."""
    method = METHODS.get(name)
    params = {spec.name: spec.high if spec.high is not None else spec.default for spec in method.params}
    models, base = _sources(method, (20000,))
    models = [m**3 for m in models]  # heavy tails: a few elements far from the rest
    base = None if base is None else -(base**3)
    magnitude = max(t.abs().max().item() for t in [*models, *([] if base is None else [base])])
    result = _call(method, models, base, params)
    assert result.abs().max().item() <= method.growth(**params) * magnitude


@pytest.mark.parametrize("magnitude", [None, 60000.0])
def test_merge_into_catches_an_overflow_to_the_output_dtype_with_or_without_a_source_bound(
    magnitude: float | None,
) -> None:
    a, b, c = (torch.full((3,), v, dtype=torch.float16) for v in (60000.0, 60000.0, -60000.0))
    out = torch.empty(3, dtype=torch.float16)
    with pytest.raises(MergeError, match="produced NaN/Inf"):
        merge_into(
            out,
            METHODS.get("add_difference"),
            [a, b],
            c,
            key="k",
            params={"alpha": 2.0},
            noise=None,
            source_magnitude=magnitude,
        )


def test_all_finite_and_max_magnitude_see_every_nan_and_inf() -> None:
    huge = torch.full((4,), 3e38)  # finite values whose float32 sum would be +Inf
    assert all_finite(huge) and max_magnitude(huge) == pytest.approx(3e38)
    assert max_magnitude(torch.tensor([-5.0, 2.0])) == 5.0
    assert math.isnan(max_magnitude(torch.tensor([1.0, math.nan, -math.inf])))
    assert all_finite(torch.zeros(0))
    assert all_finite(torch.arange(5))
    assert not all_finite(torch.tensor([1.0, math.nan]))
    assert not all_finite(torch.tensor([math.inf, -math.inf]))  # the sum is NaN, not Inf
    assert not all_finite(torch.tensor([65504.0, math.inf], dtype=torch.float16))


Weight = Annotated[float, Param(0.0, 1.0, "a weight")]


def test_fast_paths_are_only_for_element_wise_methods() -> None:
    def into(out: Tensor, models: list[Tensor], base: Tensor | None, *, alpha: float) -> None:
        out.copy_(models[0])

    def method(models: list[Tensor], base: Tensor | None, *, alpha: Weight = 0.5):
        """A"""
        return models[0].clone()

    with pytest.raises(TypeError, match="need an element-wise method"):
        MergeMethod.from_function(method, name="x", needs_base=False, compute_into=into)


# ---------------------------------------------------------------------------------------------
# Registration: the signature is the spec
# ---------------------------------------------------------------------------------------------


def test_param_specs_are_derived_from_the_signature_in_order() -> None:
    def scaled(
        models: list[Tensor],
        base: Tensor | None,
        *,
        alpha: Weight = 0.25,
        steps: Annotated[int, Param(1, None, "how many")] = 3,
        beta: Annotated[float, Param(doc="required, unbounded")],
    ):
        """A·α·β"""
        return models[0] * alpha * beta

    method = MergeMethod.from_function(scaled, name="scaled", needs_base=False)
    assert method.params == (
        ParamSpec("alpha", 0.25, 0.0, 1.0, "a weight"),
        ParamSpec("steps", 3.0, 1.0, None, "how many", integer=True),
        ParamSpec("beta", None, None, None, "required, unbounded"),
    )
    assert method.formula == "A·α·β" and not method.random
    assert method.defaults() == {"alpha": 0.25, "steps": 3.0}


def test_a_method_is_random_exactly_when_it_takes_noise() -> None:
    def noisy(models: list[Tensor], base: Tensor | None, *, alpha: Weight = 0.5, noise: Noise):
        """A + α·noise"""
        return models[0] + alpha * noise.uniform(0, 0, models[0].numel(), "cpu").view_as(models[0])

    method = MergeMethod.from_function(noisy, name="noisy", needs_base=False)
    assert method.random and not method.weighted and method.param_names() == ("alpha",)


def test_a_method_is_weighted_exactly_when_it_takes_weights() -> None:
    def mean(models: list[Tensor], base: Tensor | None, *, weights: Sequence[float] | None = None):
        """Σ wi·Mi / Σ wi"""
        return models[0].clone()

    method = MergeMethod.from_function(mean, name="mean", needs_base=False, max_models=None)
    assert method.weighted and not method.random and method.params == ()


def _untyped_param(models: list[Tensor], base: Tensor | None, *, alfa: float = 0.5):
    """A"""
    return models[0]


def _unannotated_param(models: list[Tensor], base: Tensor | None, *, alpha=0.5):
    """A"""
    return models[0]


def _string_param(models: list[Tensor], base: Tensor | None, *, mode: Annotated[str, Param()] = "a"):
    """A"""
    return models[0]


def _non_numeric_default(models: list[Tensor], base: Tensor | None, *, alpha: Weight = "half"):  # type: ignore[assignment]
    """A"""
    return models[0]


def _default_out_of_range(models: list[Tensor], base: Tensor | None, *, alpha: Weight = 2.0):
    """A"""
    return models[0]


def _positional_param(models: list[Tensor], base: Tensor | None, alpha: Weight = 0.5):
    """A"""
    return models[0]


def _one_positional(models: list[Tensor], *, alpha: Weight = 0.5):
    """A"""
    return models[0]


def _var_keyword(models: list[Tensor], base: Tensor | None, **params: float):
    """A"""
    return models[0]


def _var_positional(models: list[Tensor], base: Tensor | None, *more: Tensor):
    """A"""
    return models[0]


def _optional_noise(models: list[Tensor], base: Tensor | None, *, noise: Noise | None = None):
    """A"""
    return models[0]


def _required_weights(models: list[Tensor], base: Tensor | None, *, weights: Sequence[float]):
    """A"""
    return models[0]


def _weights_as_a_list(models: list[Tensor], base: Tensor | None, *, weights: list[float] | None = None):
    """A"""
    return models[0]


def _no_docstring(models: list[Tensor], base: Tensor | None, *, alpha: Weight = 0.5):
    return models[0]


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (_untyped_param, r"parameter 'alfa' needs a type Annotated\[float, Param\(low, high, doc\)\]"),
        (_unannotated_param, "parameter 'alpha' needs a type Annotated.*, got no annotation"),
        (_string_param, "parameter 'mode' needs a type Annotated"),
        (_non_numeric_default, "parameter 'alpha' has a non-numeric default 'half'"),
        (_default_out_of_range, r"parameter 'alpha': default must be in \[0, 1\], got 2"),
        (_positional_param, r"must take \(models, base, \*, <param>"),
        (_one_positional, r"must take \(models, base, \*, <param>"),
        (_var_keyword, r"must take \(models, base, \*, <param>.*\*\*params"),
        (_var_positional, r"must take \(models, base, \*, <param>.*\*more"),
        (_optional_noise, r"a random method takes `noise: Noise` without a default"),
        (_required_weights, r"a weighted method takes `weights: Sequence\[float\] \| None = None`"),
        (_weights_as_a_list, r"a weighted method takes `weights: Sequence\[float\] \| None = None`"),
        (_no_docstring, "the docstring's first line must give the formula"),
    ],
)
def test_a_declaration_that_cannot_be_derived_raises_type_error_naming_method_and_parameter(
    fn: Callable[..., Tensor], message: str
) -> None:
    name = fn.__name__
    with pytest.raises(TypeError, match=rf"merge method 'bad' \([\w.]*test_methods\.{name}\): {message}"):
        register_method("bad", needs_base=False)(fn)
    assert "bad" not in METHODS


def test_registering_a_method_name_twice_raises() -> None:
    def weighted_sum(models: list[Tensor], base: Tensor | None, *, alpha: Weight = 0.5):
        """A"""
        return models[0]

    with pytest.raises(ValueError, match="'weighted_sum' is registered twice"):
        register_method("weighted_sum", needs_base=False)(weighted_sum)
    assert METHODS.get("weighted_sum").fn is not weighted_sum


def test_param_spec_with_default_outside_its_range_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match=r"must be in \[0, 1\], got 2"):
        ParamSpec("alpha", 2.0, 0.0, 1.0, "")


@pytest.mark.parametrize(
    ("low", "high", "text"),
    [(0.0, 1.0, "[0, 1]"), (0.0, None, "[0, inf)"), (None, 2.5, "(-inf, 2.5]"), (None, None, "(-inf, inf)")],
)
def test_param_range_text_shows_bounds_and_open_ends(low, high, text) -> None:
    assert ParamSpec("x", None, low, high, "").range_text() == text


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (2.3, "must be in [0, 2], got 2.3"),  # over high
        (-1e-09, "must be in [0, 2], got -1e-09"),  # under low, short form kept
        (2.0000000000000004, "must be in [0, 2], got 2.0000000000000004"),  # never rounded to "2"
        (1.5, "must be a whole number, got 1.5"),
        (float("nan"), "must be a finite number, got nan"),
        (float("inf"), "must be a finite number, got inf"),
    ],
)
def test_param_check_names_the_range_and_the_value_as_written(value: float, message: str) -> None:
    spec = ParamSpec("steps", None, 0.0, 2.0, "", integer=True)
    assert spec.check(value) == message
    assert spec.check(0.0) is None and spec.check(2.0) is None  # both ends inclusive


def test_param_spec_low_above_high_is_a_programming_error_naming_the_parameter() -> None:
    with pytest.raises(TypeError, match=r"parameter 'alpha': low 1.0 > high 0.0"):
        ParamSpec("alpha", None, 1.0, 0.0, "")
    ParamSpec("alpha", None, 1.0, 1.0, "")  # a single point is a range


# Every method's parameters, as recipes and studies rely on them: (name, default, low, high, integer).
DECLARED = {
    "add_difference": [("alpha", 1.0, 0.0, 2.0, False)],
    "average": [],
    "dare": [("alpha", 1.0, 0.0, 2.0, False), ("density", 0.5, 0.0, 1.0, False)],
    "dare_ties": [("alpha", 1.0, 0.0, 2.0, False), ("density", 0.5, 0.0, 1.0, False)],
    "della": [
        ("alpha", 1.0, 0.0, 2.0, False),
        ("density", 0.5, 0.0, 1.0, False),
        ("epsilon", 0.1, 0.0, 1.0, False),
    ],
    "geometric_median": [("max_iter", 100.0, 1.0, 1000.0, True)],
    "model_stock": [("alpha", 1.0, 0.0, 2.0, False)],
    "slerp": [("alpha", 0.5, 0.0, 1.0, False)],
    "task_sum": [("alpha", 1.0, 0.0, 2.0, False)],
    "ties": [("alpha", 1.0, 0.0, 2.0, False), ("density", 0.5, 0.0, 1.0, False)],
    "train_difference": [("alpha", 1.0, 0.0, 1.0, False)],
    "weighted_sum": [("alpha", 0.5, 0.0, 1.0, False)],
}


@pytest.mark.parametrize("name", ALL)
def test_every_method_declares_its_documented_parameters(name: str) -> None:
    specs = METHODS.get(name).params
    assert [(s.name, s.default, s.low, s.high, s.integer) for s in specs] == DECLARED[name]
    assert all(isinstance(s.default, float) for s in specs)


# ---------------------------------------------------------------------------------------------
# Task-arithmetic variants: configured instances of one generalized callable
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params", "random"),
    [
        ("ties", ("alpha", "density"), False),
        ("dare", ("alpha", "density"), True),
        ("dare_ties", ("alpha", "density"), True),
        ("della", ("alpha", "density", "epsilon"), True),
    ],
)
def test_task_arithmetic_variants_derive_their_specs_from_the_composed_signature(
    name: str, params: tuple[str, ...], random: bool
) -> None:
    method = METHODS.get(name)
    assert isinstance(method.fn, TaskArithmetic)
    signature = inspect.signature(method.fn)
    assert list(signature.parameters) == [
        "models",
        "base",
        *params,
        *(["noise"] if random else []),
        "weights",
    ]
    assert method.param_names() == params and method.random is random and method.weighted


def test_each_task_arithmetic_variant_keeps_its_own_formula_and_reference() -> None:
    variants = {name: METHODS.get(name) for name in ("ties", "dare", "dare_ties", "della")}
    assert len({method.formula for method in variants.values()}) == 4
    assert variants["ties"].formula.startswith("C + α·disjoint_mean(top_k(Δi, density))")
    assert variants["dare"].formula.startswith("C + α·Σ (mask_i·Δi / density)")
    assert "Yadav et al. 2023" in inspect.getdoc(variants["ties"].fn)
    assert "Deep et al. 2024" in inspect.getdoc(variants["della"].fn)


def test_a_new_task_arithmetic_variant_is_one_configured_instance() -> None:
    """Top-k without sign election: the sum of the kept deltas."""
    variant = TaskArithmetic("top_k_sum", sparsify=_top_k, elect=False, doc="C + α·Σ top_k(Δi, density)")
    method = MergeMethod.from_function(variant, name="top_k_sum", needs_base=True, max_models=None)
    c = torch.zeros(4)
    deltas = [torch.tensor([3.0, -1.0, 2.0, 0.5]), torch.tensor([-1.0, -2.0, 1.5, 0.1])]
    result = merge_tensor(method, deltas, c, key="k", params={"alpha": 0.5, "density": 0.5}, noise=None)
    torch.testing.assert_close(result, 0.5 * torch.tensor([3.0, -2.0, 3.5, 0.0]))


def _sloppy_sparsifier(delta: Tensor, model_index: int, *, density: float = 0.5) -> tuple[None, float]:
    return None, 1.0


def test_a_sparsifier_parameter_without_param_metadata_fails_registration() -> None:
    variant = TaskArithmetic("sloppy", sparsify=_sloppy_sparsifier, elect=True, doc="C")
    with pytest.raises(
        TypeError, match=r"'sloppy' \(TaskArithmetic\('sloppy'.*parameter 'density' needs a type"
    ):
        MergeMethod.from_function(variant, name="sloppy", needs_base=True)


def _three_positional_sparsifier(
    delta: Tensor, model_index: int, density: Weight = 0.5
) -> tuple[None, float]:
    return None, 1.0


def _no_model_index_sparsifier(delta: Tensor, *, density: Weight = 0.5) -> tuple[None, float]:
    return None, 1.0


def _alpha_sparsifier(delta: Tensor, model_index: int, *, alpha: Weight = 0.5) -> tuple[None, float]:
    return None, 1.0


def _weights_sparsifier(
    delta: Tensor, model_index: int, *, weights: Sequence[float] | None = None
) -> tuple[None, float]:
    return None, 1.0


def _variadic_sparsifier(*deltas: Tensor, density: Weight = 0.5) -> tuple[None, float]:
    return None, 1.0


@pytest.mark.parametrize(
    ("sparsify", "message"),
    [
        (_three_positional_sparsifier, r"must take \(delta, model_index, \*, <param>"),
        (_no_model_index_sparsifier, r"must take \(delta, model_index, \*, <param>"),
        (_variadic_sparsifier, r"must take \(delta, model_index, \*, <param>"),
        (_alpha_sparsifier, r"parameter names \['alpha'\] are taken"),
        (_weights_sparsifier, r"parameter names \['weights'\] are taken"),
    ],
)
def test_a_sparsifier_takes_the_delta_and_keywords_of_its_own(
    sparsify: Callable[..., Tensor], message: str
) -> None:
    with pytest.raises(TypeError, match=rf"sparsifier {sparsify.__name__}: {message}"):
        TaskArithmetic("bad", sparsify=sparsify, elect=True, doc="C")


# ---------------------------------------------------------------------------------------------
# merge_tensor, check_finite, noise_for
# ---------------------------------------------------------------------------------------------


def test_merge_tensor_rejects_a_non_finite_result_naming_method_and_key() -> None:
    a, b, c = torch.ones(3), torch.tensor([1.0, math.inf, 1.0]), torch.zeros(3)
    with pytest.raises(MergeError) as caught:
        merge_tensor(
            METHODS.get("add_difference"), [a, b], c, key="x.weight", params={"alpha": 1.0}, noise=None
        )
    assert str(caught.value) == (
        "merge method 'add_difference' produced NaN/Inf values for tensor 'x.weight' (alpha=1); "
        "check the sources for NaN/Inf, try smaller parameters, or export in a wider dtype"
    )
    from automerge.merge.methods._apply import _non_finite_result

    several = _non_finite_result(METHODS.get("ties"), "k", {"alpha": 0.5, "density": 0.25})
    assert "tensor 'k' (alpha=0.5, density=0.25);" in str(several)


@pytest.mark.parametrize(
    ("models", "base", "message"),
    [
        ([torch.ones(2), torch.ones(2)], None, "needs a base model"),
        ([torch.ones(2)], torch.ones(2), "takes 2 non-base models, got 1"),
        ([torch.ones(2), torch.ones(3)], torch.ones(2), r"different shapes \[\(2,\), \(3,\)\]"),
        ([torch.ones(2, dtype=torch.int64), torch.ones(2)], torch.ones(2), "torch.int64.*not a float dtype"),
    ],
)
def test_merge_tensor_rejects_sources_that_cannot_be_merged(
    models: list[Tensor], base: Tensor | None, message: str
) -> None:
    with pytest.raises(MergeError, match=f"'add_difference', tensor 'k': .*{message}"):
        merge_tensor(METHODS.get("add_difference"), models, base, key="k", params={"alpha": 1.0}, noise=None)


def test_check_finite_names_model_and_key() -> None:
    key = "model.diffusion_model.out.2.weight"
    check_finite(torch.ones(3), model="b", key=key)
    with pytest.raises(MergeError, match=rf"model b: tensor '{key}' has NaN/Inf values \(2 of 3\)"):
        check_finite(torch.tensor([math.nan, 1.0, -math.inf]), model="b", key=key)


def test_noise_for_draws_from_blake2b_of_seed_key_and_model_index() -> None:
    noise = noise_for("a.weight", 7)
    assert noise == Noise(seed=7, key="a.weight")
    digest = hashlib.blake2b(b"7\0a.weight\x002", digest_size=8).digest()
    assert noise_key(7, "a.weight", 2) == (
        int.from_bytes(digest[:4], "little"),
        int.from_bytes(digest[4:], "little"),
    )
    assert noise_keys(7, "a.weight", 12) == [
        noise_key(7, "a.weight", i) for i in range(12)
    ]  # 10, 11: two digits
    draw = noise.uniform(2, 0, 64, "cpu")
    assert draw.dtype == torch.float32 and 0.0 <= draw.min() and draw.max() < 1.0
    assert torch.equal(draw, noise_for("a.weight", 7).uniform(2, 0, 64, "cpu"))
    assert torch.equal(draw, counter_uniform(noise_key(7, "a.weight", 2), 0, 64))
    for other in (
        noise_for("b.weight", 7).uniform(2, 0, 64, "cpu"),
        noise_for("a.weight", 8).uniform(2, 0, 64, "cpu"),
        noise.uniform(3, 0, 64, "cpu"),
    ):
        assert not torch.equal(draw, other)


# ---------------------------------------------------------------------------------------------
# N-model methods stream over the models: stacked references, weights, O(1) models held
# ---------------------------------------------------------------------------------------------

N_MODEL = [name for name, method in METHODS.items() if method.max_models is None]
WEIGHTS = [0.5, 1.5, 0.0, 2.0, 0.75]
FEWER_ITERATIONS = {"geometric_median": {"max_iter": 5.0}}


def _five(shape: tuple[int, ...] = (6, 7)) -> tuple[list[Tensor], Tensor]:
    base = _randn(*shape, seed=200)
    return [base + _randn(*shape, seed=201 + i) for i in range(5)], base


def _left_to_right(stacked: Tensor) -> Tensor:
    """Σ over dim 0 in model order (the documented order; ``sum(dim=0)`` may add in another)."""
    total = stacked[0].clone()
    for row in stacked[1:]:
        total += row
    return total


def _elected_reference(kept: list[Tensor], weights: Sequence[float]) -> Tensor:
    """Stacked: T / W over the kept Δi whose sign is sign(Σ kept Δi), W = Σ of their weights."""
    stacked = torch.stack(kept)  # (N, *shape)
    elected = torch.sign(_left_to_right(stacked))
    agree = torch.sign(stacked) * elected > 0
    column = torch.tensor(weights, dtype=stacked.dtype).view(-1, *[1] * (stacked.dim() - 1))
    total = _left_to_right(torch.where(agree, stacked, 0.0))
    weight = _left_to_right(torch.where(agree, column, 0.0))
    return total / torch.where(weight > 0, weight, 1.0)


def _task_reference(
    name: str, models: list[Tensor], base: Tensor, weights: Sequence[float], alpha: float, density: float
) -> Tensor:
    """Each variant from its definition on stacked deltas, with the documented masks."""
    from automerge.merge.methods.task_arithmetic import _della_keep

    deltas = [model - base for model in models]
    if name == "ties":
        masks = [_top_k_by_stable_sort(delta, density) != 0 for delta in deltas]
        probabilities: list[Tensor | float] = [1.0] * len(deltas)
    elif name == "della":
        probabilities = [_della_keep(delta, density, 0.1) for delta in deltas]
        masks = [_draws(_noise(3), base.shape, i) < p for i, p in enumerate(probabilities)]
    else:
        masks, probabilities = _masks(_noise(3), density, base.shape, len(deltas)), [density] * len(deltas)
    kept = [
        w * torch.where(mask, delta / p, 0.0)
        for w, mask, delta, p in zip(weights, masks, deltas, probabilities, strict=True)
    ]
    merged = _left_to_right(torch.stack(kept)) if name == "dare" else _elected_reference(kept, weights)
    return base + alpha * merged


@pytest.mark.parametrize("name", ["ties", "dare", "dare_ties", "della"])
def test_streamed_task_arithmetic_equals_the_stacked_definition_with_weights(name: str) -> None:
    models, base = _five()
    models[1][0, :3] = base[0, :3]  # zero deltas: never kept by sign, never agree
    params = {"alpha": 0.8, "density": 0.6}
    result = _run(name, models, base, seed=3, weights=WEIGHTS, **params)
    assert torch.equal(result, _task_reference(name, models, base, WEIGHTS, **params))


def _old_top_k(delta: Tensor, density: float) -> Tensor:
    """The definition before streaming: the kept Δ itself (zeros elsewhere)."""
    return _top_k_by_stable_sort(delta, density)


def _old_disjoint_mean(deltas: Tensor) -> Tensor:
    """The definition before streaming (count of agreeing models, no weights)."""
    elected = torch.sign(deltas.sum(dim=0))
    agree = torch.sign(deltas) * elected > 0
    count = agree.sum(dim=0).clamp(min=1)
    return torch.where(agree, deltas, 0.0).sum(dim=0) / count


def test_ties_and_dare_with_every_weight_one_equal_their_old_definitions() -> None:
    """Two models: the old ``sum(dim=0)`` of two rows is their one addition, so the bits must agree."""
    models, base = _five((9, 4))
    models = models[:2]
    old_ties = base + 0.7 * _old_disjoint_mean(torch.stack([_old_top_k(m - base, 0.4) for m in models]))
    masks = _masks(_noise(3), 0.4, base.shape, 2)
    dropped = [torch.where(mask, (m - base) / 0.4, 0.0) for mask, m in zip(masks, models, strict=True)]
    old_dare = base + 0.7 * torch.stack(dropped).sum(dim=0)
    old_dare_ties = base + 0.7 * _old_disjoint_mean(torch.stack(dropped))
    for weights in (None, [1.0] * 2):
        assert torch.equal(_run("ties", models, base, weights=weights, alpha=0.7, density=0.4), old_ties)
        assert torch.equal(
            _run("dare", models, base, seed=3, weights=weights, alpha=0.7, density=0.4), old_dare
        )
        assert torch.equal(
            _run("dare_ties", models, base, seed=3, weights=weights, alpha=0.7, density=0.4), old_dare_ties
        )


def test_task_sum_is_dare_at_density_one_and_base_plus_weighted_deltas() -> None:
    models, base = _five()
    result = _run("task_sum", models, base, weights=WEIGHTS, alpha=0.6)
    assert torch.equal(result, _run("dare", models, base, weights=WEIGHTS, alpha=0.6, density=1.0))
    expected = base.double() + 0.6 * sum(
        w * (m - base).double() for w, m in zip(WEIGHTS, models, strict=True)
    )
    torch.testing.assert_close(result.double(), expected, rtol=0, atol=1e-5)


def test_average_is_the_weighted_mean_and_a_model_twice_is_that_model() -> None:
    models, _ = _five()
    expected = sum(w * m.double() for w, m in zip(WEIGHTS, models, strict=True)) / sum(WEIGHTS)
    torch.testing.assert_close(
        _run("average", models, None, weights=WEIGHTS).double(), expected, rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        _run("average", models, None).double(), torch.stack(models).double().mean(dim=0), rtol=0, atol=1e-6
    )
    assert torch.equal(_run("average", [models[0]] * 2, None), models[0])


def test_average_with_weights_summing_to_zero_raises_merge_error() -> None:
    with pytest.raises(MergeError, match=r"'average': the model weights \[0.0, 0.0\] sum to 0"):
        _run("average", [torch.ones(2), torch.zeros(2)], None, weights=[0.0, 0.0])


def _weiszfeld_reference(points: Tensor, weights: Tensor, iterations: int = 500) -> Tensor:
    """Stacked float64 Weiszfeld from the weighted mean."""
    flat = points.reshape(len(points), -1)
    median = (weights @ flat) / weights.sum()
    for _ in range(iterations):
        coefficients = weights / torch.linalg.vector_norm(flat - median, dim=1).clamp(min=1e-8)
        median = (coefficients @ flat) / coefficients.sum()
    return median.view(points.shape[1:])


def test_streamed_geometric_median_equals_stacked_weiszfeld_with_weights() -> None:
    models, _ = _five((4, 5))
    weights = [1.0, 2.0, 0.5, 1.0, 3.0]
    expected = _weiszfeld_reference(torch.stack(models).double(), torch.tensor(weights, dtype=torch.float64))
    result = _run("geometric_median", models, None, weights=weights, max_iter=1000)
    torch.testing.assert_close(result.double(), expected, rtol=0, atol=1e-5)
    unweighted = _weiszfeld_reference(torch.stack(models).double(), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(
        _run("geometric_median", models, None, max_iter=1000).double(), unweighted, rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("count", [2, 5])
def test_streamed_model_stock_equals_the_pairwise_cosine_definition(count: int) -> None:
    models, base = _five((3, 8))
    models = models[:count]
    deltas = [(m - base).double().flatten() for m in models]
    cosines = [
        torch.dot(deltas[i], deltas[j]) / (deltas[i].norm() * deltas[j].norm())
        for i in range(count)
        for j in range(i + 1, count)
    ]
    cos = sum(cosines) / len(cosines)
    t = count * cos / (1 + (count - 1) * cos)
    expected = base.double() + 0.9 * t * torch.stack(deltas).mean(0).view(base.shape)
    torch.testing.assert_close(
        _run("model_stock", models, base, alpha=0.9).double(), expected, rtol=0, atol=1e-5
    )


class _CountingLoads:
    """Loaders that hand out a fresh copy of each model per access and count accesses and, by weak
    references, how many loaded tensors are alive at once (the peak is reached at a load)."""

    def __init__(self, models: list[Tensor]) -> None:
        self.models = models
        self.loads = [0] * len(models)
        self.refs: list[weakref.ref[Tensor]] = []
        self.peak = 0

    def _load(self, index: int) -> Tensor:
        self.loads[index] += 1
        tensor = self.models[index].clone()
        self.refs.append(weakref.ref(tensor))
        self.peak = max(self.peak, sum(ref() is not None for ref in self.refs))
        return tensor

    def sources(self) -> LazySources:
        loaders = [lambda i=i: self._load(i) for i in range(len(self.models))]
        return LazySources(loaders, shape=self.models[0].shape, dtype=self.models[0].dtype)


@pytest.mark.parametrize("name", N_MODEL)
def test_n_model_methods_hold_at_most_two_loaded_models_whatever_their_number(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from automerge.merge.methods import _spec

    monkeypatch.setattr(_spec, "MULTI_PASS_BYTES", 0)  # as for keys too large to hold between passes
    method = METHODS.get(name)
    base = _randn(5, 4, seed=300) if method.needs_base else None
    models = [_randn(5, 4, seed=301 + i) for i in range(8)]
    params = method.defaults() | FEWER_ITERATIONS.get(name, {})
    counting = _CountingLoads(models)
    noise = _noise(4) if method.random else None
    result = merge_tensor(method, counting.sources(), base, key="k", params=params, noise=noise)
    assert counting.peak <= 2  # the model being read and at most the one before it
    assert len(set(counting.loads)) == 1  # every model read equally often: once per pass
    assert torch.equal(result, merge_tensor(method, models, base, key="k", params=params, noise=noise))
    out = torch.empty(5, 4)
    merge_into(out, method, _CountingLoads(models).sources(), base, key="k", params=params, noise=noise)
    assert torch.equal(out, result)


@pytest.mark.parametrize(
    ("name", "passes", "multi_pass_bytes"),
    [
        ("ties", 1, 5 * 42 * 4),  # the five kept deltas fit: the election reuses them
        ("ties", 2, 5 * 42 * 4 - 1),  # one byte short: the election reads every model again
        ("geometric_median", 1, 5 * 42 * 4),  # the five models fit: held for every Weiszfeld step
        ("geometric_median", 1 + 5, 5 * 42 * 4 - 1),  # the mean, then one read per step (max_iter 5)
        ("dare", 1, 0),
        ("task_sum", 1, 0),
        ("average", 1, 0),
        ("model_stock", 1, 0),
    ],
)
def test_n_model_methods_read_each_model_once_per_pass(
    name: str, passes: int, multi_pass_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from automerge.merge.methods import _spec

    monkeypatch.setattr(_spec, "MULTI_PASS_BYTES", multi_pass_bytes)
    method = METHODS.get(name)
    models, base = _five()
    params = method.defaults() | FEWER_ITERATIONS.get(name, {})
    counting = _CountingLoads(models)
    result = merge_tensor(
        method,
        counting.sources(),
        base if method.needs_base else None,
        key="k",
        params=params,
        noise=_noise(),
    )
    assert counting.loads == [passes] * 5
    assert torch.equal(
        result,
        merge_tensor(
            method,
            models,
            base if method.needs_base else None,
            key="k",
            params=params,
            noise=_noise(),
        ),
    )


def test_lazy_sources_are_checked_from_their_header_without_loading() -> None:
    def never() -> Tensor:
        raise AssertionError("loaded")

    lazy = LazySources([never] * 3, shape=(2, 3), dtype=torch.float16)
    assert len(lazy) == 3 and lazy.shape == (2, 3) and lazy.dtype == torch.float16
    with pytest.raises(
        MergeError, match=r"'ties', tensor 'k': sources have different shapes \[\(2,\), \(2, 3\)\]"
    ):
        merge_tensor(METHODS.get("ties"), lazy, torch.zeros(2), key="k", params={}, noise=None)
    ints = LazySources([never] * 2, shape=(2,), dtype=torch.int64)
    with pytest.raises(MergeError, match="torch.int64.*not a float dtype"):
        merge_tensor(METHODS.get("average"), ints, None, key="k", params={}, noise=None)


def test_a_slice_of_lazy_or_upcast_sources_keeps_their_layout_and_loads_only_its_models() -> None:
    """Methods slice their sources (``models[1:]`` after the first model); a slice is lazy too, with the
    same header shape and dtype, and an upcast slice converts as its parent does."""
    from automerge.merge.methods._apply import _Upcast

    loaded: list[int] = []

    def loader(i: int) -> Callable[[], Tensor]:
        return lambda: loaded.append(i) or torch.full((2,), float(i), dtype=torch.float16)

    lazy = LazySources([loader(i) for i in range(4)], shape=(2,), dtype=torch.float16)
    tail = lazy[1:3]
    assert isinstance(tail, LazySources) and len(tail) == 2 and not loaded
    assert (tail.shape, tail.dtype) == (torch.Size([2]), torch.float16)
    assert [float(t[0]) for t in tail] == [1.0, 2.0] and loaded == [1, 2]
    upcast = _Upcast(lazy, torch.float32)[2:]
    assert (upcast.shape, upcast.dtype, len(upcast)) == (torch.Size([2]), torch.float32, 2)
    assert [t.dtype for t in upcast] == [torch.float32] * 2 and float(upcast[1][0]) == 3.0


def test_register_method_keeps_every_declared_property(monkeypatch) -> None:
    """A plug-in's ``register_method`` arguments all reach the registered ``MergeMethod`` (the
    built-ins register at import, where a mutation run cannot reach them)."""
    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))  # registered into a copy

    def into(out, models, base, *, alpha: Weight = 0.5) -> None:
        out.copy_(models[0])

    def inplace(out, models, base, *, alpha: Weight = 0.5) -> None:
        out.copy_(models[0])

    def growth(*, alpha: float = 0.5) -> float:
        return 1.0

    @register_method(
        "plugin_first", needs_base=True, min_models=1, max_models=3, elementwise=True,
        inplace=inplace, compute_into=into, growth=growth,
    )  # fmt: skip
    def plugin_first(models: Sequence[Tensor], base: Tensor | None, *, alpha: Weight = 0.5) -> Tensor:
        """first model"""
        return models[0]

    method = METHODS.get("plugin_first")
    assert method.fn is plugin_first and method.name == "plugin_first" and method.formula == "first model"
    assert (method.needs_base, method.min_models, method.max_models) == (True, 1, 3)
    assert (method.elementwise, method.random, method.weighted) == (True, False, False)
    assert (method.inplace, method.compute_into, method.growth) == (inplace, into, growth)
    assert method.param_names() == ("alpha",) and method.defaults() == {"alpha": 0.5}


def test_lazy_sources_refuse_a_tensor_that_disagrees_with_the_header() -> None:
    lazy = LazySources([lambda: torch.zeros(3)], shape=(2,), dtype=torch.float32)
    with pytest.raises(
        MergeError, match=r"lazy source 0 loaded a \(3,\) torch.float32 tensor, its header says \(2,\)"
    ):
        lazy[0]


@pytest.mark.parametrize(
    ("name", "weights", "message"),
    [
        (
            "add_difference",
            [1.0, 1.0],
            r"'add_difference', tensor 'k': takes no per-model weights, got \[1.0, 1.0\]",
        ),
        ("ties", [1.0], r"'ties', tensor 'k': needs one weight per non-base model \(2\), got \[1.0\]"),
        ("ties", [1.0, math.nan], r"'ties', tensor 'k': weights must be finite numbers, got \[1.0, nan\]"),
    ],
)
def test_merge_tensor_rejects_weights_the_method_cannot_use(
    name: str, weights: list[float], message: str
) -> None:
    method = METHODS.get(name)
    models, base = _sources(method, (3,), count=2)
    with pytest.raises(MergeError, match=message):
        merge_tensor(method, models, base, key="k", params=method.defaults(), noise=None, weights=weights)


@pytest.mark.parametrize("name", [name for name, method in METHODS.items() if method.weighted])
def test_weighted_methods_with_all_weights_one_equal_the_default(name: str) -> None:
    method = METHODS.get(name)
    models, base = _sources(method, (4, 3), count=3)
    params = method.defaults() | FEWER_ITERATIONS.get(name, {})
    noise = _noise(2) if method.random else None
    default = merge_tensor(method, models, base, key="k", params=params, noise=noise)
    ones = merge_tensor(method, models, base, key="k", params=params, noise=noise, weights=[1.0] * 3)
    assert torch.equal(default, ones)


def test_counter_uniform_draws_do_not_depend_on_the_chunking() -> None:
    keys = noise_key(11, "x.weight", 3)
    whole = counter_uniform(keys, 0, 1000)
    parts = [counter_uniform(keys, start, stop - start) for start, stop in [(0, 1), (1, 333), (333, 1000)]]
    assert torch.equal(torch.cat(parts), whole)
    assert torch.equal(counter_uniform(keys, 2**33 + 5, 10), counter_uniform(keys, 2**33, 20)[5:15])


def test_dare_keeps_density_of_the_elements_and_draws_are_uniform() -> None:
    n = 100_000
    result = _run("dare", [torch.ones(n)], torch.zeros(n), seed=8, alpha=1.0, density=0.3)
    assert set(result.unique().tolist()) <= {0.0, (torch.ones(1) / 0.3).item()}
    assert abs((result != 0).float().mean().item() - 0.3) < 0.01  # σ ≈ 0.0015
    draws = counter_uniform(noise_key(8, "k", 0), 0, n)
    assert abs(draws.mean().item() - 0.5) < 0.01 and draws.min() >= 0 and draws.max() < 1


def test_dare_masks_differ_between_models_and_keys() -> None:
    n = 1000
    ones = torch.ones(n)
    first = _run("dare", [ones, ones], torch.zeros(n), seed=1, density=0.5)
    assert not torch.equal(_draws(_noise(1), (n,), 0) < 0.5, _draws(_noise(1), (n,), 1) < 0.5)
    assert set(first.unique().tolist()) == {0.0, 2.0, 4.0}  # both, one or neither kept
    other_key = METHODS.get("dare").fn(
        [ones, ones], torch.zeros(n), alpha=1.0, density=0.5, noise=_noise(1, "other")
    )
    assert not torch.equal(first, other_key)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_magnitude_order_is_the_stable_descending_argsort_in_every_float_width(dtype: torch.dtype) -> None:
    """The integer view of |Δ| orders as the values, with +0, ties, subnormals and infinity."""
    values = torch.tensor([0.0, 2.0, 1e-40, 2.0, float("inf"), 0.5, 0.0, 1e-5, 2.0], dtype=torch.float64)
    magnitude = torch.cat([values, _randn(200, seed=320).double().abs()]).to(dtype)
    expected = torch.argsort(magnitude, descending=True, stable=True)
    assert torch.equal(magnitude_order(magnitude), expected)


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "subnormal"])
def test_kth_largest_by_histograms_equals_kthvalue_and_counts_the_elements_above(kind: str) -> None:
    """The radix select TIES's top-k uses from RADIX_SELECT_NUMEL elements on gives kthvalue's value,
    and the count above it, for every k: ties on the threshold, all zeros, subnormal bits."""
    generator = torch.Generator().manual_seed(3)
    n = RADIX_SELECT_NUMEL + 12_345
    values = {
        "normal": torch.randn(n, generator=generator),
        "ties": torch.randint(-3, 4, (n,), generator=generator).float() * 0.25,
        "zeros": torch.zeros(n),
        "subnormal": torch.randn(n, generator=generator) * 1e-40,
    }[kind]
    bits = magnitude_bits(values.abs())
    for k in (1, 2, n // 3, n // 2, n - 1, n):
        value, above = kth_largest(bits, k)
        expected = torch.kthvalue(bits, n - k + 1).values
        assert int(value) == int(expected) and above == int((bits > expected).sum()), k
        assert value.dtype == torch.int32 and value.shape == ()  # compared with the bits as kthvalue's


def test_kth_largest_selects_large_int32_bits_by_histograms_not_kthvalue(monkeypatch) -> None:
    """The radix select is the fast path (3x kthvalue on CPU): large int32 bits never reach kthvalue;
    small ones and int64 bits (float64 magnitudes) do."""
    calls: list[tuple[torch.dtype, int]] = []
    real = torch.kthvalue

    def spy(values: Tensor, k: int):
        calls.append((values.dtype, values.numel()))
        return real(values, k)

    monkeypatch.setattr(torch, "kthvalue", spy)
    large = magnitude_bits(_randn(RADIX_SELECT_NUMEL, seed=5).abs())
    kth_largest(large, 10)
    assert calls == []
    kth_largest(large[: RADIX_SELECT_NUMEL - 1], 10)
    kth_largest(magnitude_bits(_randn(RADIX_SELECT_NUMEL, seed=5).double().abs()), 10)
    assert calls == [(torch.int32, RADIX_SELECT_NUMEL - 1), (torch.int64, RADIX_SELECT_NUMEL)]


def test_grid_norm_is_the_same_in_any_order_and_close_to_the_exact_norm() -> None:
    """``grid_norm`` (geometric median's distances): the same bits for any order of the elements, the
    float64 norm rounded to float32 within an ulp, 0 for zeros, inf or nan for non-finite ones."""
    from automerge.merge.methods.geometric_median import grid_norm

    generator = torch.Generator().manual_seed(5)
    for numel in (1, 7, 1_000, 300_001):
        x = torch.randn(numel, generator=generator) * torch.rand(numel, generator=generator) ** 8
        shuffled = x[torch.randperm(numel, generator=generator)]
        assert torch.equal(grid_norm(x), grid_norm(shuffled))
        exact = torch.linalg.vector_norm(x.double())
        assert abs(float(grid_norm(x)) - float(exact)) <= 1.2e-7 * float(exact)
    assert float(grid_norm(torch.zeros(5))) == 0.0
    assert float(grid_norm(torch.tensor([1.0, float("inf")]))) == math.inf
    assert math.isnan(float(grid_norm(torch.tensor([1.0, float("nan")]))))
