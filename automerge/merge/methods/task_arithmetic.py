"""Task arithmetic on the deltas Δi = Mi − C: TIES, DARE, DARE-TIES, DELLA and the plain task sum.

One generalized callable, ``TaskArithmetic`` (mergekit's GeneralizedTaskArithmeticMerge): a keep
mask per Δi, then either the sum of the kept Δi or a sign election and the disjoint mean, and α
times the result added to C. The registered variants are configured instances that differ only in
the sparsifier (top-k, Bernoulli drop, DELLA's rank-dependent drop) and ``elect``. A sparsifier
``sparsify(delta, model_index, *, <param>: Annotated[float, Param(...)] = default, ...)`` returns
(keep mask or None, keep probability p) and declares its own parameters, and ``noise: Noise`` when
it is random; an instance's signature is α, then them, then the per-model ``weights``, from which
``register_method`` derives the method's parameters.

The arithmetic is ``_task_core``'s, element by element in the same order as the live engine's
chunked merge (so both give the same bits), streamed over the models: the sum takes one pass, the
sign election two (S = Σ kept_i, then T and W with kept_i recomputed); memory stays at a few tensors
whatever the number of models. Masks are per tensor (one ranking of |Δi| over the whole tensor);
random draws are ``counter_uniform`` keyed by (seed, key, model index), the same on every device.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Annotated, Any

import torch
from torch import Tensor

from automerge.merge._fused_cpu import ExportRule, KeyRun, fused_kernel
from automerge.merge.methods._spec import (
    Param,
    fits_between_passes,
    model_weights,
    register_method,
    require_noise,
)
from automerge.merge.methods._task_core import (
    Noise,
    add_agreeing,
    add_into,
    agree_weight,
    apply_delta,
    disjoint_mean,
    draw_threshold,
    election_is_fast_exact,
    kth_largest,
    magnitude_bits,
    magnitude_order,
    noise_key_bytes,
    weighted_delta,
)

Scale = Annotated[float, Param(0.0, 2.0, "scale of the merged delta added to C")]
Density = Annotated[float, Param(0.0, 1.0, "fraction of each delta kept (0 keeps nothing: the result is C)")]
Epsilon = Annotated[float, Param(0.0, 1.0, "spread of DELLA's keep probability across magnitude ranks")]

Keep = tuple[Tensor | None, Tensor | float]  # (keep mask, None = every element; keep probability p)
Sparsifier = Callable[..., Keep]  # sparsify(delta, model_index, **params) -> (keep, p)


class TaskArithmetic:
    """C + α·combine(w_i·keep_i·Δi / p_i); combine = disjoint mean after sign election, or sum.

    A configured instance is a merge method: its ``__signature__`` is ``(models, base, *, alpha,
    <the sparsifier's keyword parameters>, weights)`` and its docstring is ``doc`` (the variant's
    formula line, then its reference).
    """

    __signature__: inspect.Signature

    def __init__(self, name: str, *, sparsify: Sparsifier, elect: bool, doc: str) -> None:
        self.name = name
        self.sparsify = sparsify
        self.elect = elect
        self.__doc__ = doc
        self.__signature__ = _compose_signature(sparsify)

    def __call__(
        self,
        models: Sequence[Tensor],
        base: Tensor | None,
        *,
        alpha: Scale = 1.0,
        weights: Sequence[float] | None = None,
        **sparsify_params: Any,
    ) -> Tensor:
        """The merge; ``sparsify_params`` are the sparsifier's (see ``__signature__``)."""
        assert base is not None
        if "noise" in self.__signature__.parameters:
            require_noise(sparsify_params.get("noise"), method=self.name)
        w = model_weights(weights, len(models), method=self.name)
        merged = (
            self._elect(models, base, w, sparsify_params)
            if self.elect
            else self._sum(models, base, w, sparsify_params)
        )
        return apply_delta(base, merged, alpha)

    def stored_into(
        self,
        out: Tensor,
        models: Sequence[Tensor],
        base: Tensor | None,
        *,
        alpha: float = 1.0,
        weights: Sequence[float] | None = None,
        **sparsify_params: Any,
    ) -> bool:
        """``out`` ← this merge of the sources as stored (CPU views), through the fused kernel's
        ``task_export``: the torch path's operations, one pass over each model for its top-k cut (two
        where no sample brackets it; DELLA: a radix sort for its ranks) and one for the merge. False
        when it cannot: no kernel, weights whose sign election the kernel does not reproduce (< 0, or
        in (0, tiny)), tensors it does not take, a non-finite delta or kept value."""
        kernel, found = fused_kernel(), self._export_rule(len(models), alpha, weights, sparsify_params)
        if kernel is None or found is None or base is None:
            return False
        rule, density, top_k = found
        if top_k:
            rule = replace(rule, keep_count=_keep_count(density, out.numel()))
        else:
            noise = sparsify_params["noise"]
            rule = replace(rule, draw_keys=noise_key_bytes(noise.seed, noise.key, len(models)))
        return kernel.task_export(out, models, base, rule)

    def stored_run_into(
        self,
        out: Tensor,
        models: Sequence[Tensor],
        base: Tensor | None,
        *,
        sizes: Sequence[int],
        noises: Sequence[Noise] | None = None,
        alpha: float = 1.0,
        weights: Sequence[float] | None = None,
        **sparsify_params: Any,
    ) -> bool:
        """``stored_into`` of each key of a run laid back to back in flat views (key j: ``sizes[j]``
        elements, its draws ``noises[j]``), in one kernel call per thread (``task_export_run``); the
        same bits as key by key. False when ``stored_into`` would be, for any key."""
        kernel, found = fused_kernel(), self._export_rule(len(models), alpha, weights, sparsify_params)
        if kernel is None or found is None or base is None:
            return False
        rule, density, top_k = found
        if top_k:
            run = KeyRun(tuple(sizes), keep_counts=tuple(_keep_count(density, n) for n in sizes))
        elif noises is not None and len(noises) == len(sizes):
            draw_keys = b"".join(noise_key_bytes(x.seed, x.key, len(models)) for x in noises)
            run = KeyRun(tuple(sizes), draw_keys=draw_keys)
        else:
            return False
        return kernel.task_export_run(out, models, base, rule, run)

    def _export_rule(
        self, count: int, alpha: float, weights: Sequence[float] | None, sparsify_params: dict[str, Any]
    ) -> tuple[ExportRule, float, bool] | None:
        """The kernel's rule of this merge without its per-key part (top-k's k, the draws' keys), the
        density, and whether it keeps by top-k (else by draws); None when the kernel cannot reproduce
        it (weights < 0 or in (0, tiny) with the sign election)."""
        keep = _KERNEL_KEEP.get(self.sparsify.__name__)
        if keep is None:
            return None
        w = model_weights(weights, count, method=self.name)
        agree = [agree_weight(x) for x in w]
        if self.elect and not election_is_fast_exact(w, agree):
            return None
        defaults = {name: p.default for name, p in self.__signature__.parameters.items()}
        density = float(sparsify_params.get("density", defaults["density"]))
        drops: dict[str, Any] = {}
        if keep == "draws":
            drops = {"density": density, "draw_threshold": draw_threshold(density)}
        elif keep == "ranks":
            epsilon = float(sparsify_params.get("epsilon", defaults["epsilon"]))
            drops = {"density": density, "spread": della_spread(density, epsilon)}
        rule = ExportRule(
            elect=self.elect, alpha=alpha, weights=tuple(w), agree_weights=tuple(agree), **drops
        )
        return rule, density, keep == "top_k"

    def _kept(self, model: Tensor, index: int, base: Tensor, weight: float, params: dict[str, Any]) -> Tensor:
        """kept_i = w_i · where(keep_i, Δi / p_i, 0) for model ``index``."""
        keep, probability = self.sparsify(model - base, index, **params)
        return weighted_delta(model, base, keep, probability, weight)

    def _sum(
        self,
        models: Sequence[Tensor],
        base: Tensor,
        w: list[float],
        params: dict[str, Any],
        keep: list[Tensor] | None = None,
    ) -> Tensor:
        """S = kept_0 + kept_1 + ... (one pass, left to right); each kept_i is appended to ``keep``
        when given."""
        total: Tensor | None = None
        for i, model in enumerate(models):
            kept = self._kept(model, i, base, w[i], params)
            if keep is not None:
                keep.append(kept)
            if total is None:
                total = kept if keep is None else kept.clone()  # the sum is made in place
            else:
                add_into(total, kept)
        assert total is not None
        return total

    def _elect(
        self, models: Sequence[Tensor], base: Tensor, w: list[float], params: dict[str, Any]
    ) -> Tensor:
        """T / W over the kept_i whose sign is sign(S) (two passes: S, then T and W). The kept_i of the
        first pass are kept for the second when they fit (``fits_between_passes``); else the second
        pass reads and computes them again (memory stays at a few tensors whatever N is)."""
        first: list[Tensor] | None = [] if fits_between_passes(len(models), base.shape, base.dtype) else None
        elected = self._sum(models, base, w, params, first).sign_()
        agreeing_sum, agreeing_weight = torch.zeros_like(base), torch.zeros_like(base)
        for i in range(len(models)):
            kept = first[i] if first is not None else self._kept(models[i], i, base, w[i], params)
            add_agreeing(agreeing_sum, agreeing_weight, kept, elected, w[i])
        return disjoint_mean(agreeing_sum, agreeing_weight)

    def __repr__(self) -> str:
        return f"TaskArithmetic({self.name!r}, sparsify={self.sparsify.__name__}, elect={self.elect})"


def _compose_signature(sparsify: Sparsifier) -> inspect.Signature:
    """``TaskArithmetic.__call__``'s ``(models, base, *, alpha)`` + ``sparsify``'s keyword parameters
    + ``weights``."""
    merge = inspect.signature(TaskArithmetic.__call__, eval_str=True)
    head = [p for p in merge.parameters.values() if p.name != "self" and p.kind is not p.VAR_KEYWORD]
    tail = [p for p in head if p.name == "weights"]
    head = [p for p in head if p.name != "weights"]
    own = inspect.signature(sparsify, eval_str=True)
    parameters = list(own.parameters.values())
    keywords = parameters[2:]
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if (
        len(parameters) < 2
        or any(p.kind not in positional for p in parameters[:2])
        or any(p.kind is not p.KEYWORD_ONLY for p in keywords)
    ):
        raise TypeError(
            f"sparsifier {sparsify.__name__}: must take (delta, model_index, *, <param>: "
            f"Annotated[float, Param(...)] = default, ...), takes {own}"
        )
    clash = {p.name for p in [*head, *tail]} & {p.name for p in keywords}
    if clash:
        raise TypeError(f"sparsifier {sparsify.__name__}: parameter names {sorted(clash)} are taken")
    return merge.replace(parameters=[*head, *keywords, *tail])


def _register(variant: TaskArithmetic) -> TaskArithmetic:
    fused = variant.sparsify.__name__ in _KERNEL_KEEP
    register_method(
        variant.name,
        needs_base=True,
        max_models=None,
        stored_into=variant.stored_into if fused else None,
        stored_run_into=variant.stored_run_into if fused else None,
    )(variant)
    return variant


# -- sparsifiers: (keep mask, keep probability) of one model's delta ------------------------------


_KERNEL_KEEP = {"_top_k": "top_k", "_bernoulli_drop": "draws", "_della_drop": "ranks"}
"""The sparsifiers the fused kernel's export reproduces, and how (DELLA: draws against its ranks'
probabilities, ``fused_della_run``)."""


def _keep_count(density: float, numel: int) -> int:
    """k = ⌊density·n + ½⌋: the nearest whole number of elements, halves rounded up."""
    return min(numel, int(density * numel + 0.5))


def _top_k(delta: Tensor, model_index: int, *, density: Density = 0.5) -> Keep:
    """Keep the k largest |Δ| (ties broken by position: the earlier element wins); p = 1.

    The k-th largest |Δ| is found with one selection of its bits (``kth_largest``), not a sort: every
    element above it is kept, and of the elements equal to it, the first k − #above in index order.
    """
    flat = delta.flatten()
    n = flat.numel()
    k = _keep_count(density, n)
    if k == n:
        return None, 1.0
    if k == 0:
        return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device), 1.0
    magnitude = magnitude_bits(flat.abs())
    threshold, above = kth_largest(magnitude, k)
    keep = magnitude > threshold
    room = k - above
    tied = torch.nonzero(magnitude == threshold).squeeze(1)  # ascending positions
    keep[tied[:room]] = True
    return keep.view(delta.shape), 1.0


def _bernoulli_drop(delta: Tensor, model_index: int, *, density: Density = 0.5, noise: Noise) -> Keep:
    """DARE: keep element j where u_j < density (u = the model's counter-based draws); p = density."""
    return _draws(delta, model_index, noise) < density, density


def _della_drop(
    delta: Tensor, model_index: int, *, density: Density = 0.5, epsilon: Epsilon = 0.1, noise: Noise
) -> Keep:
    """DELLA: keep element j where u_j < p_j, its rank-dependent probability; p = p_j."""
    probability = _della_keep(delta, density, epsilon)
    return _draws(delta, model_index, noise) < probability, probability


def _draws(delta: Tensor, model_index: int, noise: Noise) -> Tensor:
    """u_j ~ U[0, 1), float32, for every element of ``delta`` (counted from element 0)."""
    return noise.uniform(model_index, 0, delta.numel(), delta.device).view(delta.shape)


def della_spread(density: float, epsilon: float) -> float:
    """DELLA's ε' = min(ε, 2·density, 2·(1 − density)): every keep probability stays in [0, 1]."""
    return min(epsilon, 2 * density, 2 * (1 - density))


def _della_keep(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """p_j = density + ε'·(r_j/n − (n+1)/(2n)), ε' = min(ε, 2·density, 2·(1 − density)).

    r_j = 1…n is the ascending rank of |Δ_j|, with equal |Δ| ordered as the mirror of top-k's order:
    among equal |Δ| the EARLIER element gets the HIGHER rank (r = n − its place in top-k's stable
    descending order). The cap ε' keeps every p_j in [0, 1] and centred on density (mergekit instead
    rejects density ± ε outside (0, 1)), so the expected kept fraction is density and density 0 or 1
    keeps nothing or everything.
    """
    flat = delta.flatten()
    n = flat.numel()
    spread = della_spread(density, epsilon)
    order = magnitude_order(flat.abs())
    rank = torch.empty_like(flat)
    rank[order] = torch.arange(n, 0, -1, dtype=flat.dtype, device=flat.device)
    keep = density + spread * (rank / n - (n + 1) / (2 * n))
    return keep.clamp(0.0, 1.0).view(delta.shape)  # the clamp only absorbs rounding


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
        Per-model weights w_i (default 1) scale each kept Δi, and the mean divides by the agreeing
        models' Σ w_i (mergekit's weighted disjoint mean).
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
        L1 norm (mergekit's optional rescale_norm). Per-model weights w_i (default 1) scale each Δi.
        The draws are counter-based per (seed, tensor key, model), so the mask of an element does not
        depend on the device or on how the tensor is chunked.
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
        1/density, then TIES sign election on the sum and the mean of the agreeing survivors, weighted
        by the per-model weights w_i (default 1) as in ties.
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
        election (weighted by w_i as in ties). ε is capped at ε' so that every p_i lies in [0, 1]
        around density. Equal |Δ| are ranked as the mirror of ties' top-k: the earlier element ranks
        higher.
        """,
    )
)


@register_method("task_sum", needs_base=True, max_models=None, elementwise=True)
def task_sum(
    models: Sequence[Tensor],
    base: Tensor | None,
    *,
    alpha: Scale = 1.0,
    weights: Sequence[float] | None = None,
) -> Tensor:
    """C + α·Σ w_i·(Mi − C)

    Task arithmetic (Ilharco et al. 2023; mergekit's "task_arithmetic", sd-mecha's add_difference
    over many models): the weighted deltas summed without sparsifying or normalising. DARE at
    density 1 gives the same bits; this is its one-pass, draw-free form.
    """
    assert base is not None
    w = model_weights(weights, len(models), method="task_sum")
    total: Tensor | None = None
    for i, model in enumerate(models):
        kept = weighted_delta(model, base, None, 1.0, w[i])
        if total is None:
            total = kept
        else:
            add_into(total, kept)
    assert total is not None
    return apply_delta(base, total, alpha)
