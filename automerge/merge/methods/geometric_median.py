"""Geometric median of the models (no base): the point minimising the (weighted) sum of Euclidean
distances, streamed over the models (one pass per Weiszfeld step)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from torch import Tensor

from automerge.merge._fused_cpu import fused_kernel
from automerge.merge.methods._spec import Param, held_if_small, model_weights, register_method
from automerge.merge.methods.average import weighted_mean

DISTANCE_FLOOR = 1e-8  # ε in 1/max(‖Mi − m‖, ε): a model at m gets a large, finite weight
RELATIVE_TOLERANCE = 1e-7  # stop when ‖m_new − m‖ ≤ tol·‖m‖


def _geometric_median_stored_run_into(
    out: Tensor,
    models: Sequence[Tensor],
    base: Tensor | None,
    *,
    sizes: Sequence[int],
    max_iter: int = 100,
    weights: Sequence[float] | None = None,
) -> bool:
    """``geometric_median`` of each key of a run laid back to back in flat stored views (key j:
    ``sizes[j]`` elements) into ``out`` (the fused kernel's ``geometric_median_run``: the method's
    operations and norms, each result rounded once); the same bits as key by key."""
    w = _checked_weights(weights, len(models))
    kernel = fused_kernel()
    return (
        kernel is not None
        and sum(w) != 0
        and out.is_contiguous()
        and kernel.geometric_median_run(
            out.view(-1), [m.reshape(-1) for m in models], w, sizes, int(max_iter)
        )
    )


def _geometric_median_stored_into(
    out: Tensor,
    models: Sequence[Tensor],
    base: Tensor | None,
    *,
    max_iter: int = 100,
    weights: Sequence[float] | None = None,
) -> bool:
    """``geometric_median`` of one key straight from its stored sources (a run of one key)."""
    sizes = [out.numel()] if out.numel() else []
    return _geometric_median_stored_run_into(
        out, models, base, sizes=sizes, max_iter=max_iter, weights=weights
    )


@register_method(
    "geometric_median",
    needs_base=False,
    max_models=None,
    stored_into=_geometric_median_stored_into,
    stored_run_into=_geometric_median_stored_run_into,
)
def geometric_median(
    models: Sequence[Tensor],
    base: Tensor | None,
    *,
    max_iter: Annotated[int, Param(1, 1000, "Weiszfeld iterations at most")] = 100,
    weights: Sequence[float] | None = None,
) -> Tensor:
    """Weiszfeld: m ← Σ ci·Mi / Σ ci, ci = wi/max(‖Mi − m‖, 1e-8), from the weighted mean, ≤ max_iter steps

    sd-mecha's geometric_median (after krishnap25/geom_median, which also takes weights wi, default
    1): norms over the whole tensor (``grid_norm``: the same bits in any order, so on any device and
    in the CPU kernel); stops early when ‖m_new − m‖ ≤ 1e-7·‖m‖. Each step is one pass over the
    models, held between steps when they fit in ``MULTI_PASS_BYTES``, else read holding one at a time;
    sums accumulate left to right, so the last bits differ from a stacked matrix product; one device
    sync per step for the stopping test.
    """
    w = _checked_weights(weights, len(models))
    models = held_if_small(models)  # small keys: read once for every step
    median = weighted_mean(models, w, method="geometric_median")
    for _ in range(int(max_iter)):  # the config layer passes whole numbers as floats
        updated = _weiszfeld_step(models, w, median)
        step = grid_norm(updated - median)
        median = updated
        if step <= RELATIVE_TOLERANCE * grid_norm(median):
            break
    return median


def _checked_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    w = model_weights(weights, count, method="geometric_median")
    if any(weight < 0 for weight in w):
        raise ValueError(f"merge method 'geometric_median' takes weights ≥ 0, got {w}")
    return w


def _weiszfeld_step(models: Sequence[Tensor], w: list[float], median: Tensor) -> Tensor:
    """Σ ci·Mi / Σ ci with ci = (1 / max(‖Mi − m‖, 1e-8))·wi (float32), in one pass."""
    total: Tensor | None = None
    coefficient_sum = torch.zeros((), dtype=median.dtype, device=median.device)
    for model, weight in zip(models, w, strict=True):
        distance = grid_norm(model - median).clamp(min=DISTANCE_FLOOR)  # ()
        coefficient = distance.reciprocal() * weight  # what weight / distance computes, said plainly
        term = model * coefficient
        total = term if total is None else total.add_(term)
        coefficient_sum += coefficient
    assert total is not None
    return total.div_(coefficient_sum)


def grid_norm(difference: Tensor) -> Tensor:
    """‖d‖₂ in d's dtype, the same bits whatever order its terms are added in: each d_j² (in float64:
    exact for float32 d) rounded to the nearest multiple of g = 2^(e − b), ties to even, where 2^(e−1) ≤ max d_j²
    < 2^e and b = min(52, 62 − ⌈log2 n⌉) (so the largest term is ~2^b grid steps and the sum of n fits
    in int64), summed exactly as integers, then √(Σ·g) rounded once to d's dtype. The sum's error is at
    most n·2^−b of its largest term (2^−31 at 2 M elements), below float32's rounding; a vector_norm's
    sum depends on how it is split into lanes and threads. No device sync. Non-finite d: inf or nan,
    as vector_norm gives."""
    squares = difference.detach().double().square().flatten()
    if squares.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=difference.device)
    largest = squares.max()
    grid_bits = min(52, 62 - (squares.numel() - 1).bit_length())
    exponent = torch.frexp(largest).exponent.to(torch.int64)
    steps = (grid_bits - exponent).clamp(-1000, 1000)  # 1/g = 2^steps; the clamp: frexp of inf or nan
    scale = ((steps + 1023) << 52).view(torch.float64)  # the float64 2^steps, from its bits
    total = torch.round(squares * scale).to(torch.int64).sum()  # not finite: unused
    fixed = (total.double() / scale).sqrt().to(difference.dtype)
    return torch.where(torch.isfinite(largest), fixed, largest.sqrt().to(difference.dtype))
