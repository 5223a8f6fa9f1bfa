"""Interpolation between two models: weighted sum (linear) and slerp (spherical)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from torch import Tensor

from automerge.merge.methods._spec import Param, register_method

ShareOfB = Annotated[float, Param(0.0, 1.0, "share of B: 0 gives A, 1 gives B (supermerger's alpha)")]

_COLINEAR_DOT = 0.9995  # |cos ω| above this: slerp falls back to lerp (mergekit's DOT_THRESHOLD)


def _lerp_into(out: Tensor, models: Sequence[Tensor], base: Tensor | None, *, alpha: float) -> None:
    """out ← (1−α)·A + α·B in one pass (``torch.lerp``), A or B bit-exactly at α = 0 or 1.

    The one kernel of weighted sum: ``weighted_sum`` allocates ``out`` and calls it, and the live
    engine calls it directly on tensors already in ``out``'s dtype. The endpoints are copies because
    float rounding in lerp does not guarantee them.
    """
    a, b = models
    if alpha in (0.0, 1.0):
        out.copy_(a if alpha == 0.0 else b)
    else:
        torch.lerp(a, b, alpha, out=out)


@register_method(
    "weighted_sum",
    needs_base=False,
    elementwise=True,
    inplace=_lerp_into,
    growth=lambda alpha: 1.0,  # a convex combination lies between A and B
)
def weighted_sum(models: Sequence[Tensor], base: Tensor | None, *, alpha: ShareOfB = 0.5) -> Tensor:
    """(1−α)·A + α·B

    torch.lerp, α = share of B as in supermerger and A1111 (ComfyUI's ratio is 1−α). α = 0 gives A
    and α = 1 gives B bit-exactly.
    """
    out = torch.empty_like(models[0])
    _lerp_into(out, models, base, alpha=alpha)
    return out


@register_method("slerp", needs_base=False)
def slerp(models: Sequence[Tensor], base: Tensor | None, *, alpha: ShareOfB = 0.5) -> Tensor:
    """(sin((1−α)ω)·Â + sin(αω)·B̂)/sin ω · lerp(‖A‖, ‖B‖, α), ω = arccos(Â·B̂) on flattened tensors

    Â, B̂ are the unit vectors of the whole flattened tensors (as sd-mecha and mergekit do); when
    |cos ω| > 0.9995 (mergekit's DOT_THRESHOLD; near-colinear, incl. 1-element tensors) or a norm
    is 0 it is the plain lerp.
    α = 0 gives A and α = 1 gives B bit-exactly. Branch-free (no device sync): the two cases are
    two pairs of scalar coefficients chosen with torch.where.
    """
    if alpha in (0.0, 1.0):
        return weighted_sum(models, base, alpha=alpha)  # A or B bit-exactly
    a, b = models
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)  # () each
    safe_a = torch.where(norm_a > 0, norm_a, torch.ones_like(norm_a))
    safe_b = torch.where(norm_b > 0, norm_b, torch.ones_like(norm_b))
    dot = (torch.sum(a * b) / (safe_a * safe_b)).clamp(-1.0, 1.0)
    omega = torch.arccos(dot)
    sin_omega = torch.sin(omega)
    use_lerp = (dot.abs() > _COLINEAR_DOT) | (norm_a == 0) | (norm_b == 0)
    safe_sin = torch.where(use_lerp, torch.ones_like(sin_omega), sin_omega)
    norm = torch.lerp(norm_a, norm_b, alpha)
    coef_a = torch.sin((1.0 - alpha) * omega) / safe_sin * norm / safe_a
    coef_b = torch.sin(alpha * omega) / safe_sin * norm / safe_b
    coef_a = torch.where(use_lerp, 1.0 - alpha, coef_a)
    coef_b = torch.where(use_lerp, alpha, coef_b)
    return coef_a * a + coef_b * b
