"""Task arithmetic on the deltas Δi = Mi − C: TIES, DARE, DARE-TIES and DELLA.

One generalized callable, ``TaskArithmetic`` (mergekit's GeneralizedTaskArithmeticMerge): sparsify
each Δi, then either sum them or elect a sign per element and take the disjoint mean, and add α
times the result to C. The registered methods are configured instances that differ only in the
sparsifier (top-k, Bernoulli drop, DELLA's rank-dependent drop) and ``elect``. A sparsifier
``sparsify(delta, *, <param>: Annotated[float, Param(...)] = default, ...)`` declares its own
parameters, and ``generator: torch.Generator`` when it is random; an instance's signature is α
followed by them, from which ``register_method`` derives the method's parameters.

Sparsifiers work on the whole tensor flattened (one ranking per tensor). Random ones draw only
from the given generator, in model order, so equal generator states give equal results; CPU and
CUDA generators produce different streams.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import torch
from torch import Tensor

from automerge.merge.methods._spec import Param, register_method, require_generator

Scale = Annotated[float, Param(0.0, 2.0, "scale of the merged delta added to C")]
Density = Annotated[float, Param(0.0, 1.0, "fraction of each delta kept (0 keeps nothing: the result is C)")]
Epsilon = Annotated[float, Param(0.0, 1.0, "spread of DELLA's keep probability across magnitude ranks")]

Sparsifier = Callable[..., Tensor]  # sparsify(delta, **params) -> delta with elements zeroed (rescaled)


class TaskArithmetic:
    """C + α·combine(sparsify(Mi − C)); combine = disjoint mean after sign election, or sum.

    A configured instance is a merge method: its ``__signature__`` is ``(models, base, *, alpha,
    <the sparsifier's keyword parameters>)`` and its docstring is ``doc`` (the variant's formula
    line, then its reference).
    """

    __signature__: inspect.Signature

    def __init__(self, name: str, *, sparsify: Sparsifier, elect: bool, doc: str) -> None:
        self.name = name
        self.sparsify = sparsify
        self.elect = elect
        self.__doc__ = doc
        self.__signature__ = _compose_signature(sparsify)

    def __call__(
        self, models: Sequence[Tensor], base: Tensor | None, *, alpha: Scale = 1.0, **sparsify_params: Any
    ) -> Tensor:
        """The merge; ``sparsify_params`` are the sparsifier's (see ``__signature__``)."""
        assert base is not None
        if "generator" in self.__signature__.parameters:
            require_generator(sparsify_params.get("generator"), method=self.name)
        sparse = [self.sparsify(model - base, **sparsify_params) for model in models]
        deltas = torch.stack(sparse)  # (N, *shape)
        merged = _disjoint_mean(deltas) if self.elect else deltas.sum(dim=0)
        return base + alpha * merged

    def __repr__(self) -> str:
        return f"TaskArithmetic({self.name!r}, sparsify={self.sparsify.__name__}, elect={self.elect})"


def _compose_signature(sparsify: Sparsifier) -> inspect.Signature:
    """``TaskArithmetic.__call__``'s ``(models, base, *, alpha)`` + ``sparsify``'s keyword parameters."""
    merge = inspect.signature(TaskArithmetic.__call__, eval_str=True)
    head = [p for p in merge.parameters.values() if p.name != "self" and p.kind is not p.VAR_KEYWORD]
    own = inspect.signature(sparsify, eval_str=True)
    parameters = list(own.parameters.values())
    keywords = parameters[1:]
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if (
        not parameters
        or parameters[0].kind not in positional
        or any(p.kind is not p.KEYWORD_ONLY for p in keywords)
    ):
        raise TypeError(
            f"sparsifier {sparsify.__name__}: must take (delta, *, <param>: Annotated[float, Param(...)] "
            f"= default, ...), takes {own}"
        )
    clash = {p.name for p in head} & {p.name for p in keywords}
    if clash:
        raise TypeError(f"sparsifier {sparsify.__name__}: parameter names {sorted(clash)} are taken")
    return merge.replace(parameters=[*head, *keywords])


def _register(variant: TaskArithmetic) -> TaskArithmetic:
    register_method(variant.name, needs_base=True, max_models=None)(variant)
    return variant


def _disjoint_mean(deltas: Tensor) -> Tensor:
    """Mean of the Δi whose sign equals sign(ΣΔi), per element; 0 where none agree (TIES)."""
    elected = torch.sign(deltas.sum(dim=0))  # (*shape); 0 where the sum is exactly 0
    agree = torch.sign(deltas) * elected > 0  # (N, *shape); zero deltas never agree
    count = agree.sum(dim=0).clamp(min=1)
    return torch.where(agree, deltas, 0.0).sum(dim=0) / count


# -- sparsifiers ------------------------------------------------------------------------------------


def _keep_count(density: float, numel: int) -> int:
    """k = ⌊density·n + ½⌋: the nearest whole number of elements, halves rounded up."""
    return min(numel, int(density * numel + 0.5))


def _top_k(delta: Tensor, *, density: Density = 0.5) -> Tensor:
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


def _bernoulli_drop(delta: Tensor, *, density: Density = 0.5, generator: torch.Generator) -> Tensor:
    """DARE: keep each element with probability density, divide the survivors by density."""
    return _drop(delta, density, generator)


def _della_drop(
    delta: Tensor, *, density: Density = 0.5, epsilon: Epsilon = 0.1, generator: torch.Generator
) -> Tensor:
    """DELLA: keep each element with its rank-dependent probability p, divide the survivors by p."""
    return _drop(delta, _della_keep(delta, density, epsilon), generator)


def _drop(delta: Tensor, keep: Tensor | float, generator: torch.Generator) -> Tensor:
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


# -- the registered variants ------------------------------------------------------------------------

ties = _register(
    TaskArithmetic(
        "ties",
        sparsify=_top_k,
        elect=True,
        doc="""C + α·disjoint_mean(top_k(Δi, density)), sign elected as sign(Σ kept Δi)

        TIES-merging (Yadav et al. 2023) as in mergekit's "ties" and sd-mecha's ties_sum: per tensor
        keep the ⌊density·n + ½⌋ largest |Δi| (ties by position), elect the sign of the sum, average
        the kept Δi of that sign (0 where the sum is exactly 0 or none agree; mergekit elects + there).
        """,
    )
)

dare = _register(
    TaskArithmetic(
        "dare",
        sparsify=_bernoulli_drop,
        elect=False,
        doc="""C + α·Σ (mask_i·Δi / density), mask_i ~ Bernoulli(density) per element

        DARE (Yu et al. 2023), mergekit's "dare_linear" without weight normalisation: survivors are
        rescaled by 1/density (keep probability), as in sd-mecha and the paper — not to the original
        L1 norm (mergekit's optional rescale_norm).
        """,
    )
)

dare_ties = _register(
    TaskArithmetic(
        "dare_ties",
        sparsify=_bernoulli_drop,
        elect=True,
        doc="""C + α·disjoint_mean(mask_i·Δi / density), mask_i ~ Bernoulli(density), sign = sign(Σ)

        mergekit's "dare_ties" (sd-mecha's ties_sum_with_dropout): DARE's drop-and-rescale by
        1/density, then TIES sign election on the sum and the mean of the agreeing survivors.
        """,
    )
)

della = _register(
    TaskArithmetic(
        "della",
        sparsify=_della_drop,
        elect=True,
        doc="""C + α·disjoint_mean(mask_i·Δi / p_i), p_i = density + ε'·(r/n − (n+1)/2n), ε' = min(ε, 2·density, 2·(1−density))

        DELLA-merging (Deep et al. 2024; mergekit's "della", sd-mecha's della_eps): drop with a keep
        probability that grows with the magnitude rank r (1 = smallest |Δ|, per tensor), rescale each
        survivor by 1/p_i (the paper; sd-mecha divides every survivor by density), then TIES sign
        election. ε is capped at ε' so that every p_i lies in [0, 1] around density.
        """,
    )
)
