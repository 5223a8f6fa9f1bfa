"""Task arithmetic on the deltas Δi = Mi − C: TIES, DARE, DARE-TIES and DELLA.

One generalized function (mergekit's GeneralizedTaskArithmeticMerge): sparsify each Δi, then
either sum them or elect a sign per element and take the disjoint mean, and add α times the
result to C. The registered methods differ only in the sparsifier and the combination.

Sparsifiers work on the whole tensor flattened (one ranking per tensor). Random ones draw only
from the given generator, in model order, so equal generator states give equal results; CPU and
CUDA generators produce different streams.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from automerge.merge.methods._spec import ParamSpec, register_method, require_generator

ALPHA = ParamSpec("alpha", 1.0, 0.0, 2.0, "scale of the merged delta added to C")
DENSITY = ParamSpec(
    "density", 0.5, 0.0, 1.0, "fraction of each delta kept (0 keeps nothing: the result is C)"
)
EPSILON = ParamSpec("epsilon", 0.1, 0.0, 1.0, "spread of DELLA's keep probability across magnitude ranks")

Sparsifier = Callable[[Tensor], Tensor]


def _merge(
    models: Sequence[Tensor], base: Tensor, *, alpha: float, sparsify: Sparsifier, elect: bool
) -> Tensor:
    """C + α·combine(sparsify(Mi − C)); combine = disjoint mean after sign election, or sum."""
    deltas = torch.stack([sparsify(model - base) for model in models])  # (N, *shape)
    merged = _disjoint_mean(deltas) if elect else deltas.sum(dim=0)
    return base + alpha * merged


def _disjoint_mean(deltas: Tensor) -> Tensor:
    """Mean of the Δi whose sign equals sign(ΣΔi), per element; 0 where none agree (TIES)."""
    elected = torch.sign(deltas.sum(dim=0))  # (*shape); 0 where the sum is exactly 0
    agree = torch.sign(deltas) * elected > 0  # (N, *shape); zero deltas never agree
    count = agree.sum(dim=0).clamp(min=1)
    return torch.where(agree, deltas, 0.0).sum(dim=0) / count


def _keep_count(density: float, numel: int) -> int:
    """k = ⌊density·n + ½⌋: the nearest whole number of elements, halves rounded up."""
    return min(numel, int(density * numel + 0.5))


def _top_k(delta: Tensor, density: float) -> Tensor:
    """Keep the k largest |Δ| (ties broken by position: the earlier element wins), zero the rest.

    The k-th largest |Δ| is found with one selection (``kthvalue``), not a sort: every element
    above it is kept, and of the elements equal to it, the first k − #above in index order.
    """
    flat = delta.flatten()
    n = flat.numel()
    k = _keep_count(density, n)
    if k == n:
        return delta.clone()
    if k == 0:
        return torch.zeros_like(delta)
    magnitude = flat.abs()
    threshold = torch.kthvalue(magnitude, n - k + 1).values
    keep = magnitude > threshold
    room = k - int(keep.sum())
    tied = torch.nonzero(magnitude == threshold).squeeze(1)  # ascending positions
    keep[tied[:room]] = True
    return torch.where(keep, flat, 0.0).view_as(delta)


def _bernoulli(delta: Tensor, keep: Tensor | float, generator: torch.Generator) -> Tensor:
    """Keep each element with probability ``keep`` and divide survivors by it (expectation kept)."""
    draw = torch.rand(delta.shape, generator=generator, dtype=delta.dtype, device=delta.device)
    survives = draw < keep  # never where keep == 0, so the division there is never selected
    return torch.where(survives, delta / keep, 0.0)


def _della_keep(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """p_keep = density + ε'·(r/n − (n+1)/(2n)), ε' = min(ε, 2·density, 2·(1 − density)).

    r = 1…n is the ascending rank of |Δ| (ties by position). The cap ε' keeps every p_keep in
    [0, 1] and centred on density (mergekit instead rejects density ± ε outside (0, 1)), so the
    expected kept fraction is density and density 0 or 1 keeps nothing or everything.
    """
    flat = delta.flatten()
    n = flat.numel()
    spread = min(epsilon, 2 * density, 2 * (1 - density))
    order = torch.argsort(flat.abs(), stable=True)
    rank = torch.empty_like(flat)
    rank[order] = torch.arange(1, n + 1, dtype=flat.dtype, device=flat.device)
    keep = density + spread * (rank / n - (n + 1) / (2 * n))
    return keep.clamp(0.0, 1.0).view_as(delta)  # the clamp only absorbs rounding


@register_method("ties", params=(ALPHA, DENSITY), needs_base=True, max_models=None)
def ties(
    models: Sequence[Tensor],
    base: Tensor | None,
    *,
    generator: torch.Generator | None,
    alpha: float,
    density: float,
) -> Tensor:
    """C + α·disjoint_mean(top_k(Δi, density)), sign elected as sign(Σ kept Δi)

    TIES-merging (Yadav et al. 2023) as in mergekit's "ties" and sd-mecha's ties_sum: per tensor
    keep the ⌊density·n + ½⌋ largest |Δi| (ties by position), elect the sign of the sum, average
    the kept Δi of that sign (0 where the sum is exactly 0 or none agree; mergekit elects + there).
    """
    assert base is not None
    return _merge(models, base, alpha=alpha, sparsify=lambda d: _top_k(d, density), elect=True)


@register_method("dare", params=(ALPHA, DENSITY), needs_base=True, max_models=None, random=True)
def dare(
    models: Sequence[Tensor],
    base: Tensor | None,
    *,
    generator: torch.Generator | None,
    alpha: float,
    density: float,
) -> Tensor:
    """C + α·Σ (mask_i·Δi / density), mask_i ~ Bernoulli(density) per element

    DARE (Yu et al. 2023), mergekit's "dare_linear" without weight normalisation: survivors are
    rescaled by 1/density (keep probability), as in sd-mecha and the paper — not to the original
    L1 norm (mergekit's optional rescale_norm).
    """
    assert base is not None
    gen = require_generator(generator, method="dare")
    return _merge(models, base, alpha=alpha, sparsify=lambda d: _bernoulli(d, density, gen), elect=False)


@register_method("dare_ties", params=(ALPHA, DENSITY), needs_base=True, max_models=None, random=True)
def dare_ties(
    models: Sequence[Tensor],
    base: Tensor | None,
    *,
    generator: torch.Generator | None,
    alpha: float,
    density: float,
) -> Tensor:
    """C + α·disjoint_mean(mask_i·Δi / density), mask_i ~ Bernoulli(density), sign = sign(Σ)

    mergekit's "dare_ties" (sd-mecha's ties_sum_with_dropout): DARE's drop-and-rescale by
    1/density, then TIES sign election on the sum and the mean of the agreeing survivors.
    """
    assert base is not None
    gen = require_generator(generator, method="dare_ties")
    return _merge(models, base, alpha=alpha, sparsify=lambda d: _bernoulli(d, density, gen), elect=True)


@register_method("della", params=(ALPHA, DENSITY, EPSILON), needs_base=True, max_models=None, random=True)
def della(
    models: Sequence[Tensor],
    base: Tensor | None,
    *,
    generator: torch.Generator | None,
    alpha: float,
    density: float,
    epsilon: float,
) -> Tensor:
    """C + α·disjoint_mean(mask_i·Δi / p_i), p_i = density + ε'·(r/n − (n+1)/2n), ε' = min(ε, 2·density, 2·(1−density))

    DELLA-merging (Deep et al. 2024; mergekit's "della", sd-mecha's della_eps): drop with a keep
    probability that grows with the magnitude rank r (1 = smallest |Δ|, per tensor), rescale each
    survivor by 1/p_i (the paper; sd-mecha divides every survivor by density), then TIES sign
    election. ε is capped at ε' so that every p_i lies in [0, 1] around density.
    """
    assert base is not None
    gen = require_generator(generator, method="della")

    def sparsify(delta: Tensor) -> Tensor:
        return _bernoulli(delta, _della_keep(delta, density, epsilon), gen)

    return _merge(models, base, alpha=alpha, sparsify=sparsify, elect=True)
