"""Model Stock: move from the base toward the mean fine-tune by a ratio set by how aligned the deltas
are; one pass over the models, holding one at a time (the CPU kernel: two passes over all of them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from torch import Tensor

from automerge.merge._fused_cpu import fused_kernel
from automerge.merge.methods._spec import Param, register_method

_NORM_FLOOR = 1e-12  # a zero delta has cosine 0 with every other delta

Alpha = Annotated[float, Param(0.0, 2.0, "scale of t·mean(Δi); 1 is Model Stock as published")]


def unit_scale(square_sum: Tensor) -> Tensor:
    """r = 1 / max(‖Δ‖, 1e-12) from ‖Δ‖² (a float64 0-dim tensor), rounded to float32: u = Δ·r is Δ's
    unit vector. A tensor on Δ's device, so the method never waits for the device."""
    return (1.0 / square_sum.sqrt().clamp(min=_NORM_FLOOR)).float()


def stock_scale(unit_sum_square: Tensor, unit_squares: Tensor, count: int, alpha: float) -> Tensor:
    """s = α·t / N rounded to float32, t = N·cosθ / (1 + (N−1)·cosθ), cosθ = (‖Σui‖² − Σ‖ui‖²) / (N(N−1))
    clamped to [−1, 1], all in float64 (0-dim tensors); t = 0 where the deltas cancel
    (1 + (N−1)·cosθ ≤ 0)."""
    cos = ((unit_sum_square - unit_squares) / (count * (count - 1))).clamp(-1.0, 1.0)
    denominator = 1.0 + (count - 1) * cos
    positive = denominator > 0
    t = torch.where(positive, count * cos / torch.where(positive, denominator, 1.0), 0.0)
    return (alpha * t / count).float()


def _square_sum(tensor: Tensor) -> Tensor:
    """Σ x² in float64, a 0-dim tensor (each square exact: a float32 value squared fits 53 bits)."""
    return tensor.double().square().sum()


def _float64(value: float) -> Tensor:
    return torch.tensor(value, dtype=torch.float64)


def _model_stock_stored_into(
    out: Tensor, models: Sequence[Tensor], base: Tensor | None, *, alpha: float = 1.0
) -> bool:
    """``model_stock`` from the sources as stored (CPU views, or loaded CPU tensors) through the fused
    kernel's three passes (``model_stock_into``), rounded once to out's dtype; False when it cannot."""
    kernel = fused_kernel()
    if kernel is None or base is None or len(models) < 2:
        return False
    count = len(models)
    return kernel.model_stock_into(
        out,
        models,
        base,
        lambda squares: [float(unit_scale(_float64(square))) for square in squares],
        lambda unit_sum_square, unit_squares: float(
            stock_scale(_float64(unit_sum_square), _float64(unit_squares), count, alpha)
        ),
    )


def _model_stock_stored_run_into(
    out: Tensor, models: Sequence[Tensor], base: Tensor | None, *, sizes: Sequence[int], alpha: float = 1.0
) -> bool:
    """``_model_stock_stored_into`` of each key of a run laid back to back in flat views (key j:
    ``sizes[j]`` elements), in one kernel call per thread (``model_stock_run_into``)."""
    kernel = fused_kernel()
    return (
        kernel is not None
        and base is not None
        and kernel.model_stock_run_into(out, models, base, sizes, alpha)
    )


@register_method(
    "model_stock",
    needs_base=True,
    max_models=None,
    stored_into=_model_stock_stored_into,
    stored_run_into=_model_stock_stored_run_into,
)
def model_stock(models: Sequence[Tensor], base: Tensor | None, *, alpha: Alpha = 1.0) -> Tensor:
    """C + α·t·mean(Δi), t = N·cosθ / (1 + (N−1)·cosθ), cosθ = mean pairwise cosine of the flattened Δi

    Model Stock (Jang et al. 2024) as in mergekit (filter_wise off) and sd-mecha; α (default 1) is
    automerge's addition so the ratio can be tuned per block. Streamed: with ui = Δi·ri, ri =
    1/max(‖Δi‖, 1e-12) rounded to float32 (``unit_scale``), the mean pairwise cosine is
    (‖Σ ui‖² − Σ ‖ui‖²) / (N(N−1)), so one pass accumulates ΣΔi and Σ ui (float32, model order) and
    the squared norms (float64); then C + s·ΣΔi with s = α·t/N rounded to float32 (``stock_scale``).
    The CPU kernel computes the same float32 operations and sums the squares in float64 in its own
    order. When the deltas cancel exactly (1 + (N−1)·cosθ = 0) t is taken as 0 and the result is C
    (mergekit gives NaN there).
    """
    assert base is not None
    delta_sum, unit_sum = torch.zeros_like(base), torch.zeros_like(base)
    unit_squares = torch.zeros((), dtype=torch.float64, device=base.device)
    for model in models:
        delta = model - base
        unit = delta * unit_scale(_square_sum(delta))
        delta_sum += delta
        unit_sum += unit
        unit_squares += _square_sum(unit)
    scale = stock_scale(_square_sum(unit_sum), unit_squares, len(models), alpha)
    return base + delta_sum * scale
