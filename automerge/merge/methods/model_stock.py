"""Model Stock: move from the base toward the mean fine-tune by a ratio set by how aligned the deltas
are; one pass over the models, holding one at a time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from torch import Tensor

from automerge.merge.methods._spec import Param, register_method

_NORM_FLOOR = 1e-12  # a zero delta has cosine 0 with every other delta


@register_method("model_stock", needs_base=True, max_models=None)
def model_stock(
    models: Sequence[Tensor],
    base: Tensor | None,
    *,
    alpha: Annotated[float, Param(0.0, 2.0, "scale of t·mean(Δi); 1 is Model Stock as published")] = 1.0,
) -> Tensor:
    """C + α·t·mean(Δi), t = N·cosθ / (1 + (N−1)·cosθ), cosθ = mean pairwise cosine of the flattened Δi

    Model Stock (Jang et al. 2024) as in mergekit (filter_wise off) and sd-mecha; α (default 1) is
    automerge's addition so the ratio can be tuned per block. Streamed: with ui = Δi/max(‖Δi‖, 1e-12),
    the mean pairwise cosine is (‖Σ ui‖² − Σ ‖ui‖²) / (N(N−1)), so one pass accumulates ΣΔi, Σ ui and
    Σ ‖ui‖² (the last bits differ from summing the pairwise dot products). When the deltas cancel
    exactly (1 + (N−1)·cosθ = 0) t is taken as 0 and the result is C (mergekit gives NaN there).
    """
    assert base is not None
    delta_sum, unit_sum = torch.zeros_like(base), torch.zeros_like(base)
    unit_square_sum = torch.zeros((), dtype=base.dtype, device=base.device)
    for model in models:
        delta = model - base
        unit = delta / torch.linalg.vector_norm(delta).clamp(min=_NORM_FLOOR)
        delta_sum += delta
        unit_sum += unit
        unit_square_sum += torch.linalg.vector_norm(unit).square()
    n = len(models)
    cos = ((torch.linalg.vector_norm(unit_sum).square() - unit_square_sum) / (n * (n - 1))).clamp(-1.0, 1.0)
    denominator = 1 + (n - 1) * cos
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    t = torch.where(denominator > 0, n * cos / safe, torch.zeros_like(cos))
    return base + (alpha * t) * (delta_sum / n)
