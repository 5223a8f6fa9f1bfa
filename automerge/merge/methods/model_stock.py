"""Model Stock: move from the base toward the mean fine-tune by a ratio set by how aligned the deltas are."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
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
    automerge's addition so the ratio can be tuned per block. When the deltas cancel exactly
    (1 + (N−1)·cosθ = 0) t is taken as 0 and the result is C (mergekit gives NaN there).
    """
    assert base is not None
    deltas = [(model - base).flatten() for model in models]  # N × (n,)
    units = [d / torch.linalg.vector_norm(d).clamp(min=_NORM_FLOOR) for d in deltas]
    cosines = torch.stack([torch.dot(u, v) for u, v in combinations(units, 2)])  # (N(N−1)/2,)
    cos = cosines.mean().clamp(-1.0, 1.0)
    n = len(deltas)
    denominator = 1 + (n - 1) * cos
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    t = torch.where(denominator > 0, n * cos / safe, torch.zeros_like(cos))
    mean_delta = torch.stack(deltas).mean(dim=0).view_as(base)
    return base + (alpha * t) * mean_delta
