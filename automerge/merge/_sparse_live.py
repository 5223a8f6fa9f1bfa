"""Fast live re-merge of task arithmetic (ties, dare, dare_ties, della), equal bit for bit to the export.

The export (``merge_key`` → ``TaskArithmetic``) merges key by key: per model Δi = Mi − C, a keep mask
(top-k by a selection over the key, or ``Noise`` draws), then ``_task_core``'s arithmetic. Most of that
work is the same in every trial, so ``LiveTaskArithmetic`` does it once per block, at the block's first
merge, and keeps the result beside the engine's sources, one (models, elements) buffer per block
(``_Statistics``):

- top-k (ties): each element's place in its key's stable descending order of |Δi| (int32): the keep
  mask at any density is ``place < k``, with the key's k = ⌊density·n + ½⌋;
- drops (dare, dare_ties): the draws u (float32): keep = u < density;
- della: the draws and each element's ``r/n − (n+1)/(2n)`` (compute dtype; r its rank as DELLA ranks
  it), so that p = clamp(density + ε'·that, 0, 1) and keep = u < p.

A merge streams the block in chunks (cache-sized on a CPU) through element-wise torch ops, with no loop
over keys but the fill of each key's k. The ops are not ``_task_core``'s but give its bits:
``where(keep, x, 0)`` is an AND with an all-ones mask (``_keep``); the sign election sums |kept_i| where
kept_i·sign(S) > 0 and restores the sign at the end (``_elect``), which needs every kept value finite:
``_Rule.elect_is_exact`` proves that from max|source| and the smallest keep probability, else the
engine merges the block key by key through the method.

When only α changed for a block (density, ε and weights as at its last merge), its merged delta is
reused: kept (compute dtype, one buffer per block) from the first α-only change on and dropped when
another parameter changes, so a study that searches density never holds it. Memory per merged element
and non-base model: 4 bytes (ties: places; dare: draws) or 4 + the compute dtype's (della: draws and
offsets), plus at most the compute dtype's per element for the α-only buffers (``statistics_bytes``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from automerge.errors import MergeError
from automerge.merge._fused_cpu import FusedKernel, FusedRule, KeyPart, fused_kernel
from automerge.merge.methods import MergeMethod, max_magnitude, noise_for
from automerge.merge.methods._task_core import (
    agree_weight,
    draw_threshold,
    election_is_fast_exact,
    magnitude_order,
)
from automerge.merge.methods.task_arithmetic import (
    TaskArithmetic,
    _bernoulli_drop,
    _della_drop,
    _keep_count,
    _top_k,
    della_spread,
)

_TOP_K, _DROP, _DELLA = "top_k", "drop", "della"
_KINDS = {_top_k: _TOP_K, _bernoulli_drop: _DROP, _della_drop: _DELLA}
_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}  # compute dtype → its bits' integers
_BUILD_CHUNK = 1 << 24  # draws of one key made at a time
_CHUNK_BYTES = {"cpu": 12 << 20, "other": 1 << 30}  # a chunk's working set: in a CPU's cache / on a GPU


class KeySpan(Protocol):
    """One tensor key's elements ``offset … offset + numel − 1`` in its block's flat buffers."""

    @property
    def key(self) -> str: ...
    @property
    def offset(self) -> int: ...
    @property
    def numel(self) -> int: ...


def variant_of(method: MergeMethod) -> tuple[str, bool] | None:
    """(sparsifier kind, elect) when ``method`` is a ``TaskArithmetic`` variant merged here, else None."""
    fn = method.fn
    if not isinstance(fn, TaskArithmetic) or fn.sparsify not in _KINDS:
        return None
    return _KINDS[fn.sparsify], fn.elect


def statistics_bytes(
    method: MergeMethod, *, numel: int, models: int, compute_dtype: torch.dtype
) -> tuple[int, int]:
    """(bytes of the per-element statistics, bytes of the α-only buffers at most) the live engine holds
    for ``models`` non-base models over ``numel`` merged elements; (0, 0) for other methods."""
    variant = variant_of(method)
    if variant is None or compute_dtype not in _BITS:
        return 0, 0
    per_model = {_TOP_K: 4, _DROP: 4, _DELLA: 4 + compute_dtype.itemsize}[variant[0]]
    return per_model * models * numel, compute_dtype.itemsize * numel


@dataclass
class _Statistics:
    """A block's parameter-free share of every merge, each (models, elements) or None."""

    places: Tensor | None = None  # int32: place in the key's stable descending order of |Δi|
    draws: Tensor | None = None  # float32: the ``Noise`` draw of each element
    offsets: Tensor | None = None  # compute dtype: DELLA's r/n − (n+1)/(2n)

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.places, self.draws, self.offsets) if t is not None]


@dataclass
class _BlockState:
    statistics: _Statistics = field(default_factory=_Statistics)
    last: tuple[object, ...] | None = None  # ``_Rule.key`` of the block's last merge
    merged: Tensor | None = None  # its merged delta, held from an α-only change on


@dataclass(frozen=True)
class _Rule:
    """One block's parameters for one merge, resolved for the chunk loop."""

    kind: str
    elect: bool
    compute: torch.dtype
    alpha: float
    density: float
    spread: float  # DELLA's ε' = min(ε, 2·density, 2·(1 − density))
    weights: tuple[float, ...]  # each model's w_i, as ``weighted_delta`` multiplies it
    agree_weights: tuple[float, ...]  # w_i as ``add_agreeing`` adds it (``torch.where``'s dtype)
    counts: tuple[int, ...] = ()  # top-k: each key's k
    threshold: int = 0  # drops: keep ⟺ bits(u) < threshold

    def key(self) -> tuple[object, ...]:
        """All but α: two merges with equal keys have equal merged deltas."""
        return (self.density, self.spread, self.weights)

    def _delta_bound(self, magnitude: float) -> float:
        """max |Δi / p_i| over kept elements: |Δi| ≤ 2·max|source|, over the smallest kept p."""
        if self.kind == _TOP_K:
            smallest_p = 1.0
        elif self.kind == _DROP:
            smallest_p = self.density
        else:  # a positive p = density + y is ≥ half an ulp of density ≥ density·eps/4 (/8: a margin)
            smallest_p = self.density * torch.finfo(self.compute).eps / 8
        return 0.0 if smallest_p == 0.0 else 2 * magnitude / smallest_p  # 0: nothing is kept

    def elect_is_exact(self, magnitude: float) -> bool:
        """The fast sign election (``_elect``) gives the export's bits: no weight < 0, none in
        (0, tiny), and every kept value w_i·Δi/p_i finite."""
        if not election_is_fast_exact(self.weights, self.agree_weights, self.compute):
            return False
        return self._delta_bound(magnitude) * max(1.0, *self.weights) * 1.01 < torch.finfo(self.compute).max

    def surely_finite(self, magnitude: float, out: torch.dtype) -> bool:
        """Every sum stays below the compute dtype's max and |C + α·merged| below ``out``'s (bounds
        from max|source|, with 1 % for rounding); else the output is checked."""
        delta = self._delta_bound(magnitude)
        sums = delta * max(1.0, *self.weights, sum(self.weights))
        merged = delta if self.elect else delta * sum(self.weights)  # elect: a weighted mean (w_i ≥ 0)
        return sums * 1.01 < torch.finfo(self.compute).max and (
            (magnitude + abs(self.alpha) * merged) * 1.01 < torch.finfo(out).max
        )


class LiveTaskArithmetic:
    """The live engine's merge of a task-arithmetic method, block by block (see the module doc).

    ``keep_on``: where statistics and α-only buffers live (the device, or the host when the engine
    offloads: then ``staged`` and each merge copies them to ``device``, as the engine's sources).
    """

    def __init__(
        self,
        method: MergeMethod,
        *,
        seed: int,
        compute_dtype: torch.dtype,
        device: torch.device,
        keep_on: torch.device,
        staged: bool = False,
        chunk_numel: int | None = None,
        fused: bool = True,
    ) -> None:
        variant = variant_of(method)
        if variant is None or compute_dtype not in _BITS:
            raise ValueError(
                f"merge method '{method.name}' in {compute_dtype} has no live task-arithmetic merge"
            )
        self.method = method
        self.kind, self.elect = variant
        self.seed = seed
        self.compute_dtype = compute_dtype
        self.device = device
        self.keep_on = keep_on
        self.staged = staged
        self.chunk_numel = chunk_numel
        self._blocks: dict[str, _BlockState] = {}
        self._scratch: _Scratch | None = None
        self.fused: FusedKernel | None = None
        if fused and device.type == "cpu" and compute_dtype == torch.float32 and self.kind != _DELLA:
            self.fused = fused_kernel()

    @staticmethod
    def handles(method: MergeMethod, compute_dtype: torch.dtype) -> bool:
        return variant_of(method) is not None and compute_dtype in _BITS

    def sources_changed(self, blocks: Collection[str]) -> None:
        """The sources of ``blocks`` changed (LoRA strengths): their places, offsets and merged deltas
        are made again at their next merge (draws do not depend on the sources)."""
        for name in blocks:
            if name in self._blocks:
                state = self._blocks[name]
                state.statistics.places = state.statistics.offsets = None
                state.last, state.merged = None, None

    def held_bytes(self) -> int:
        """Bytes of the statistics and α-only buffers held now."""
        tensors = [
            t for s in self._blocks.values() for t in [*s.statistics.tensors(), s.merged] if t is not None
        ]
        return sum(t.numel() * t.element_size() for t in tensors)

    def merge_block(
        self,
        block: str,
        spans: Sequence[KeySpan],
        out: Tensor,
        models: Sequence[Tensor],
        base: Tensor,
        *,
        params: Mapping[str, float],
        weights: Sequence[float] | None,
        source_magnitude: float,
    ) -> bool:
        """``out`` (the block's flat output) ← the method over the flat sources, bit for bit what the
        export writes for each key; False, with nothing written, when the fast sign election cannot be
        proven exact (the caller merges key by key then). ``MergeError`` for NaN/Inf results."""
        rule = self._rule(spans, params, weights, len(models))
        if rule.elect and not rule.elect_is_exact(source_magnitude):
            return False
        state = self._state(block, spans, models, base)
        if state.merged is not None and state.last == rule.key():
            self._scale_cached(spans, out, base, self._here(state.merged), rule.alpha)
        else:
            alpha_only = state.last == rule.key()  # keep the merged delta from now on
            state.merged = (
                torch.empty(out.numel(), dtype=self.compute_dtype, device=self.keep_on)
                if alpha_only
                else None
            )
            self._merge_chunks(spans, out, models, base, state, rule)
        state.last = rule.key()
        if not rule.surely_finite(source_magnitude, out.dtype):
            _check_finite(out, spans, method=self.method.name, params=params)
        return True

    # -- per merge ---------------------------------------------------------------------------------

    def _rule(
        self,
        spans: Sequence[KeySpan],
        params: Mapping[str, float],
        weights: Sequence[float] | None,
        models: int,
    ) -> _Rule:
        density = float(params.get("density", 1.0)) + 0.0  # + 0.0: −0 → +0 (it changes only dropped values)
        w = [1.0] * models if weights is None else [float(x) for x in weights]  # as ``model_weights``
        return _Rule(
            kind=self.kind,
            elect=self.elect,
            compute=self.compute_dtype,
            alpha=float(params["alpha"]),
            density=density,
            spread=della_spread(density, float(params.get("epsilon", 0.0)) + 0.0),
            weights=tuple(w),
            agree_weights=tuple(agree_weight(x) for x in w),
            counts=tuple(_keep_count(density, s.numel) for s in spans) if self.kind == _TOP_K else (),
            threshold=draw_threshold(density, self.device) if self.kind == _DROP else 0,
        )

    def _here(self, tensor: Tensor) -> Tensor:
        """``tensor`` on the device: itself, or a copy when statistics are staged."""
        if not self.staged:
            return tensor
        copy = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
        return copy.copy_(tensor, non_blocking=self.device.type == "cuda")

    def _scratch_for(self, models: int) -> _Scratch:
        """The chunk buffers for ``models`` models (made once, again only if the count changes)."""
        if self._scratch is None or self._scratch.kept.shape[0] != models:
            chunk = self.chunk_numel or _default_chunk(self.device, models, self.compute_dtype)
            self._scratch = _Scratch.make(models, chunk, self.compute_dtype, self.device)
        return self._scratch

    def _scale_cached(
        self, spans: Sequence[KeySpan], out: Tensor, base: Tensor, merged: Tensor, alpha: float
    ) -> None:
        """out ← C + α·merged (``apply_delta``) from the held merged delta."""
        scratch = self._scratch_for(1)
        for start, stop, _ in _pieces(spans, scratch.chunk):
            c, _, work = scratch.views(stop - start)
            c.copy_(base[start:stop])
            torch.mul(merged[start:stop], alpha, out=work[0])
            torch.add(c, work[0], out=out[start:stop])

    def _merge_chunks(
        self,
        spans: Sequence[KeySpan],
        out: Tensor,
        models: Sequence[Tensor],
        base: Tensor,
        state: _BlockState,
        rule: _Rule,
    ) -> None:
        """out ← C + α·merged chunk by chunk (and the merged delta into ``state.merged`` if held)."""
        held = state.statistics
        stats = _Statistics(
            *(None if t is None else self._here(t) for t in (held.places, held.draws, held.offsets))
        )
        if self.fused is not None and self._merge_fused(
            self.fused, spans, out, models, base, stats, rule, state.merged
        ):
            return
        scratch = self._scratch_for(len(models))
        for piece in _pieces(spans, scratch.chunk):
            start, stop, _ = piece
            c, kept, work = scratch.views(stop - start)
            c.copy_(base[start:stop])
            for i, model in enumerate(models):
                kept[i].copy_(model[start:stop])
            kept.sub_(c)  # Δi = Mi − C in the compute dtype (each model's row)
            self._keep(kept, work, stats, rule, piece, spans)
            for i, weight in enumerate(rule.weights):
                if weight != 1.0:  # x·1 = x: kept values are never NaN
                    kept[i].mul_(weight)
            merged = self._elect(kept, work, rule) if rule.elect else _sum_rows(kept, work[0])
            if state.merged is not None:
                state.merged[start:stop].copy_(merged)
            torch.add(c, merged.mul_(rule.alpha), out=out[start:stop])  # C + α·merged, cast on store

    def _merge_fused(
        self,
        kernel: FusedKernel,
        spans: Sequence[KeySpan],
        out: Tensor,
        models: Sequence[Tensor],
        base: Tensor,
        stats: _Statistics,
        rule: _Rule,
        merged: Tensor | None,
    ) -> bool:
        """``_merge_chunks``' result in one pass per key on a CPU (``_fused_cpu``: the same float32
        operations in the same order); False, with nothing done, for buffers the kernel does not take."""
        if rule.kind == _TOP_K:
            assert stats.places is not None
            statistics, limits = stats.places, rule.counts
        else:
            assert stats.draws is not None
            statistics, limits = stats.draws.view(torch.int32), (rule.threshold,) * len(spans)
        return kernel.merge(
            [KeyPart(s.offset, s.offset + s.numel, limit) for s, limit in zip(spans, limits, strict=True)],
            out=out,
            models=models,
            base=base,
            statistics=statistics,
            rule=FusedRule(
                drop=rule.kind == _DROP,
                elect=rule.elect,
                density=rule.density,
                alpha=rule.alpha,
                weights=rule.weights,
                agree_weights=rule.agree_weights,
            ),
            merged=merged,
        )

    def _keep(
        self,
        kept: Tensor,
        work: Tensor,
        stats: _Statistics,
        rule: _Rule,
        piece: tuple[int, int, range],
        spans: Sequence[KeySpan],
    ) -> None:
        """kept ← where(keep, Δ / p, 0) per model: the keep mask as all-ones integers (in ``work``)
        ANDed into the values' bits (+0 where dropped, whatever Δ / p is there)."""
        start, stop, keys = piece
        bits = _BITS[self.compute_dtype]
        mask = work[: kept.shape[0]].view(bits)
        shift = 31  # place − k and bits(u) − threshold are int32 values
        if rule.kind == _TOP_K:
            assert stats.places is not None
            places = stats.places[:, start:stop]
            if len(keys) == 1:
                torch.sub(places, rule.counts[keys[0]], out=mask)  # < 0 ⟺ place < k
            else:  # a chunk of small keys: each element's k
                assert self._scratch is not None
                counts = self._scratch.counts[: stop - start]
                for index in keys:
                    span = spans[index]
                    counts[span.offset - start : span.offset + span.numel - start].fill_(rule.counts[index])
                torch.sub(places, counts, out=mask)
        elif rule.kind == _DROP:
            assert stats.draws is not None
            if rule.density != 1.0:  # as ``weighted_delta``: a probability of 1 divides by nothing
                kept.div_(rule.density)
            torch.sub(stats.draws[:, start:stop].view(torch.int32), rule.threshold, out=mask)
        else:
            assert stats.draws is not None and stats.offsets is not None
            p = work[: kept.shape[0]]
            torch.mul(stats.offsets[:, start:stop], rule.spread, out=p)  # ``_della_keep``'s order of ops
            p.add_(rule.density).clamp_(0.0, 1.0)
            kept.div_(p)
            draws = stats.draws[:, start:stop].to(self.compute_dtype)  # u < p as the export compares
            torch.sub(draws.view(bits), p.view(bits), out=mask)  # both ≥ +0: bits order = value order
            shift = torch.iinfo(bits).bits - 1
        mask.bitwise_right_shift_(shift)  # all ones where kept, else 0
        kept.view(bits).bitwise_and_(mask)

    def _elect(self, kept: Tensor, work: Tensor, rule: _Rule) -> Tensor:
        """The disjoint mean T / W of the kept_i that agree with sign(S), as ``add_agreeing`` and
        ``disjoint_mean`` compute it, in fewer passes (``kept`` is overwritten; the result is a view of
        ``work``).

        With e = sign(S) and every kept_i finite, threshold(kept_i·e, 0) is |kept_i| where kept_i
        agrees and +0 elsewhere, and its sign 1 or +0: summed in model order they are |T| (the agreeing
        kept_i all have the sign e, and rounding is symmetric) and W (w_i·1 or +0, exact products).
        T / W where W > 0 else 0 is then e·(|T| / max(W, tiny)): W > 0 means W ≥ tiny (no weight lies
        in (0, tiny)), W = 0 means |T| = +0; and e = 0 gives +0, as the export does.
        """
        elected, agreeing, weight = work[0], work[1], work[2]
        _sum_rows(kept, elected).sign_()  # e; sign(−0) = +0
        kept.mul_(elected)  # |kept_i| where it agrees, ≤ 0 (or −0) elsewhere
        torch.nn.functional.threshold_(kept, 0.0, 0.0)  # ... and +0 elsewhere (clamp would keep −0)
        _sum_rows(kept, agreeing)  # |T|: +0 + r_0 = r_0, no −0 to meet
        kept.sign_()  # 1 where it agrees, else +0
        if all(w == 1.0 for w in rule.agree_weights):
            _sum_rows(kept, weight)
        else:
            torch.mul(kept[0], rule.agree_weights[0], out=weight)
            for row, w in zip(kept[1:], rule.agree_weights[1:], strict=True):
                weight.add_(row, alpha=w)  # w·1 or w·0 is exact: fused or not, the same sum
        weight.clamp_min_(torch.finfo(self.compute_dtype).tiny)
        return agreeing.div_(weight).mul_(elected)

    # -- statistics --------------------------------------------------------------------------------

    def _state(
        self, block: str, spans: Sequence[KeySpan], models: Sequence[Tensor], base: Tensor
    ) -> _BlockState:
        """The block's state, its statistics made (from the sources on the device) when missing."""
        state = self._blocks.setdefault(block, _BlockState())
        stats = state.statistics
        if self.kind == _TOP_K and stats.places is None:
            stats.places = self._kept_here(_ranked(spans, models, base, self.compute_dtype, places=True))
        if self.kind == _DELLA and stats.offsets is None:
            stats.offsets = self._kept_here(_ranked(spans, models, base, self.compute_dtype, places=False))
        if self.kind in (_DROP, _DELLA) and stats.draws is None:
            stats.draws = self._kept_here(_draws(spans, len(models), self.seed, base.device))
        return state

    def _kept_here(self, tensor: Tensor) -> Tensor:
        if tensor.device == self.keep_on:
            return tensor
        return tensor.to(self.keep_on).pin_memory() if self.device.type == "cuda" else tensor.to(self.keep_on)


def _ranked(
    spans: Sequence[KeySpan], models: Sequence[Tensor], base: Tensor, dtype: torch.dtype, *, places: bool
) -> Tensor:
    """(models, elements): each element's place in its key's stable descending order of |Δi| (int32,
    ``places``: top-k's order, ties by position), or DELLA's r/n − (n+1)/(2n) computed as
    ``_della_keep`` computes it (r = n − place)."""
    device = base.device
    out = torch.empty((len(models), base.numel()), dtype=torch.int32 if places else dtype, device=device)
    kernel = fused_kernel() if places and device.type == "cpu" and dtype == torch.float32 else None
    for span in spans:
        part, n = slice(span.offset, span.offset + span.numel), span.numel
        if kernel is not None and kernel.places([m[part] for m in models], base[part], list(out[:, part])):
            continue  # the same places by a radix sort in C
        c = base[part].to(dtype)
        for i, model in enumerate(models):
            magnitude = (model[part].to(dtype) - c).abs_()
            order = magnitude_order(magnitude)
            if places:  # place[order[j]] = j
                out[i, part].index_copy_(0, order, torch.arange(n, dtype=torch.int32, device=device))
            else:  # as ``_della_keep``: rank[order[j]] = n − j, then r/n − (n+1)/(2n)
                rank = torch.empty(n, dtype=dtype, device=device)
                rank.index_copy_(0, order, torch.arange(n, 0, -1, dtype=dtype, device=device))
                out[i, part] = rank / n - (n + 1) / (2 * n)
    return out


def _draws(spans: Sequence[KeySpan], models: int, seed: int, device: torch.device) -> Tensor:
    """(models, elements): model i's draw of each element of each key (``noise_for(key, seed)``)."""
    out = torch.empty((models, sum(s.numel for s in spans)), dtype=torch.float32, device=device)
    for span in spans:
        noise = noise_for(span.key, seed)
        for i in range(models):
            for start in range(0, span.numel, _BUILD_CHUNK):
                count = min(_BUILD_CHUNK, span.numel - start)
                at = span.offset + start
                out[i, at : at + count] = noise.uniform(i, start, count, device)
    return out


@dataclass
class _Scratch:
    """One chunk's buffers: C in the compute dtype, kept (a row per model), work (max(models, 3)
    rows: the keep masks as integers, then S, |T| and W) and counts (int32: each element's k, for a
    chunk of several small keys)."""

    chunk: int
    base: Tensor
    kept: Tensor
    work: Tensor
    counts: Tensor

    @classmethod
    def make(cls, models: int, chunk: int, dtype: torch.dtype, device: torch.device) -> _Scratch:
        def empty(*shape: int, dtype: torch.dtype = dtype) -> Tensor:
            return torch.empty(shape, dtype=dtype, device=device)

        return cls(
            chunk,
            empty(chunk),
            empty(models, chunk),
            empty(max(models, 3), chunk),
            empty(chunk, dtype=torch.int32),
        )

    def views(self, numel: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.base[:numel], self.kept[:, :numel], self.work[:, :numel]


def _default_chunk(device: torch.device, models: int, dtype: torch.dtype) -> int:
    """Elements per chunk: the chunk's buffers (2·models + 4 rows) and the streamed sources, ranks
    and output (~16 bytes) in a CPU's last-level cache; large on a GPU."""
    budget = _CHUNK_BYTES["cpu" if device.type == "cpu" else "other"]
    return max(1 << 12, budget // ((2 * models + 4) * dtype.itemsize + 16))


def _pieces(spans: Sequence[KeySpan], chunk: int) -> Iterator[tuple[int, int, range]]:
    """(start, stop, indices of its keys) of each chunk of a block: consecutive keys smaller than
    ``chunk`` together (at most ``chunk`` elements), a larger key alone, cut into ``chunk`` pieces."""
    group: int | None = None  # the first of the small keys gathered so far
    for index, span in enumerate(spans):
        stop = span.offset + span.numel
        if group is not None and (span.numel >= chunk or stop - spans[group].offset > chunk):
            yield spans[group].offset, span.offset, range(group, index)
            group = None
        if span.numel >= chunk:
            for start in range(span.offset, stop, chunk):
                yield start, min(start + chunk, stop), range(index, index + 1)
        elif group is None:
            group = index
    if group is not None:
        yield spans[group].offset, spans[-1].offset + spans[-1].numel, range(group, len(spans))


def _sum_rows(rows: Tensor, out: Tensor) -> Tensor:
    """out ← rows[0] + rows[1] + ... left to right (S, as ``add_into``)."""
    if rows.shape[0] == 1:
        return out.copy_(rows[0])
    torch.add(rows[0], rows[1], out=out)
    for row in rows[2:]:
        out.add_(row)
    return out


def _check_finite(out: Tensor, spans: Sequence[KeySpan], *, method: str, params: Mapping[str, float]) -> None:
    """``MergeError`` naming the first key of ``out`` with NaN/Inf values (the export's message)."""
    if math.isfinite(max_magnitude(out)):
        return
    first = int(torch.nonzero(~torch.isfinite(out))[0, 0])
    key = next(s.key for s in spans if s.offset <= first < s.offset + s.numel)
    shown = ", ".join(f"{name}={value:g}" for name, value in params.items())
    raise MergeError(
        f"merge method '{method}' produced NaN/Inf values for tensor '{key}' ({shown}); "
        "check the sources for NaN/Inf, try smaller parameters, or export in a wider dtype"
    )
