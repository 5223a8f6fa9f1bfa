"""Running one merge method on one tensor: checks, lazy upcasting, per-key noise, finiteness.

Sources are any ``Sequence[Tensor]``: a list of loaded tensors, or a ``LazySources`` that loads a
model's tensor on each access, so that methods over N models hold O(1) tensors at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import overload

import torch
from torch import Tensor

from automerge.errors import MergeError
from automerge.merge.methods._spec import MergeMethod
from automerge.merge.methods._task_core import Noise


def noise_for(key: str, seed: int) -> Noise:
    """The draws of tensor ``key`` for a recipe's ``seed``: counter-based, so stable across runs,
    processes and devices, and independent of which other keys were merged before it."""
    return Noise(seed=seed, key=key)


class _OnAccess(Sequence[Tensor]):
    """A sequence of tensors made on each access (``_item``), never all held at once; a slice is
    another such sequence (``_sliced``)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def _item(self, index: int) -> Tensor:
        raise NotImplementedError

    def _sliced(self, index: slice) -> Sequence[Tensor]:
        raise NotImplementedError

    def stored(self, index: int) -> Tensor | None:
        """Model ``index``'s tensor as stored (a view of its file, not converted: a consumer that
        converts as it reads saves a pass; not checked for NaN/Inf: the consumer checks what it
        reads; in its shape or flat), or None when it is not known."""
        return None

    @overload
    def __getitem__(self, index: int) -> Tensor: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Tensor]: ...
    def __getitem__(self, index: int | slice) -> Tensor | Sequence[Tensor]:
        return self._sliced(index) if isinstance(index, slice) else self._item(index)

    def __iter__(self) -> Iterator[Tensor]:
        for index in range(len(self)):
            yield self._item(index)


def stored_tensor(models: Sequence[Tensor], index: int) -> Tensor | None:
    """Model ``index``'s tensor as stored when ``models`` reads lazily and knows it, else None."""
    return models.stored(index) if isinstance(models, _OnAccess) else None


def stored_views(models: Sequence[Tensor]) -> list[Tensor] | None:
    """Every model's tensor as stored (views: no memory) when ``models`` reads lazily and knows them
    all, else None."""
    if not isinstance(models, _OnAccess) or not len(models):
        return None
    views = []
    for index in range(len(models)):
        view = models.stored(index)
        if view is None:
            return None
        views.append(view)
    return views


class LazySources(_OnAccess):
    """Models whose tensors are loaded on each access (``loaders[i]()``, never cached), with the
    ``shape`` and ``dtype`` every loader returns known up front (from the files' headers), so that
    checks need no load and a streaming method holds one model at a time."""

    def __init__(
        self,
        loaders: Sequence[Callable[[], Tensor]],
        *,
        shape: Sequence[int],
        dtype: torch.dtype,
        stored: Sequence[Callable[[], Tensor]] | None = None,
    ) -> None:
        self._loaders = tuple(loaders)
        self._stored = None if stored is None else tuple(stored)
        self.shape = torch.Size(shape)
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self._loaders)

    def stored(self, index: int) -> Tensor | None:
        return None if self._stored is None else self._stored[index]()

    def _sliced(self, index: slice) -> Sequence[Tensor]:
        stored = None if self._stored is None else self._stored[index]
        return LazySources(self._loaders[index], shape=self.shape, dtype=self.dtype, stored=stored)

    def _item(self, index: int) -> Tensor:
        tensor = self._loaders[index]()
        if tensor.shape != self.shape or tensor.dtype != self.dtype:
            raise MergeError(
                f"lazy source {index} loaded a {tuple(tensor.shape)} {tensor.dtype} tensor, its header "
                f"says {tuple(self.shape)} {self.dtype}; the file changed while merging"
            )
        return tensor


class _Upcast(_OnAccess):
    """``models`` seen in ``dtype``: each access converts (a copy, or the tensor itself when it
    already has ``dtype``), so N sources are never all upcast at once."""

    def __init__(self, models: Sequence[Tensor], dtype: torch.dtype) -> None:
        self._models = models
        self._dtype = dtype
        self.shape = _layout(models)[0][0] if len(models) else torch.Size()
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self._models)

    def _sliced(self, index: slice) -> Sequence[Tensor]:
        return _Upcast(self._models[index], self._dtype)

    def _item(self, index: int) -> Tensor:
        return self._models[index].to(self._dtype)

    def stored(self, index: int) -> Tensor | None:
        return stored_tensor(self._models, index)


def _layout(models: Sequence[Tensor]) -> list[tuple[torch.Size, torch.dtype]]:
    """(shape, dtype) of each model, from ``LazySources``' header values without loading any."""
    if isinstance(models, LazySources):
        return [(models.shape, models.dtype)] * len(models)
    return [(model.shape, model.dtype) for model in models]


def max_magnitude(tensor: Tensor) -> float:
    """max |x| over the tensor, NaN when any element is NaN, inf when any is ±Inf (0 when empty).

    One ``aminmax`` pass: min/max reductions propagate NaN and keep ±Inf, and run at memory speed
    (about 20× faster than ``isfinite(t).all()`` on CPU).
    """
    if tensor.numel() == 0:
        return 0.0
    if not tensor.is_floating_point():
        return float(tensor.abs().max())
    low, high = torch.aminmax(tensor)
    return float(torch.maximum(low.abs(), high.abs()).float())


def all_finite(tensor: Tensor) -> bool:
    """True when no element is NaN or ±Inf (always True for integer tensors)."""
    return not tensor.is_floating_point() or math.isfinite(max_magnitude(tensor))


def check_finite(tensor: Tensor, *, model: str, key: str) -> float:
    """max |x| of a source tensor; raises ``MergeError`` when it holds NaN or Inf (it would poison
    the merge)."""
    magnitude = max_magnitude(tensor) if tensor.is_floating_point() else 0.0
    if not math.isfinite(magnitude):
        bad = int((~torch.isfinite(tensor)).sum())
        raise MergeError(
            f"model {model}: tensor '{key}' has NaN/Inf values ({bad} of {tensor.numel()}); "
            "the checkpoint is damaged or overflowed when saved, use another copy"
        )
    return magnitude


def result_is_surely_finite(
    method: MergeMethod, params: Mapping[str, float], dtype: torch.dtype, source_magnitude: float | None
) -> bool:
    """True when ``method.growth`` proves |result| ≤ growth·max|source| stays below ``dtype``'s max
    (with a 1 % margin for rounding), so the output needs no NaN/Inf check."""
    if source_magnitude is None or method.growth is None or not dtype.is_floating_point:
        return False
    return method.growth(**params) * source_magnitude * 1.01 < torch.finfo(dtype).max


def merge_tensor(
    method: MergeMethod,
    models: Sequence[Tensor],
    base: Tensor | None,
    *,
    key: str,
    params: Mapping[str, float],
    noise: Noise | None,
    weights: Sequence[float] | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``method.fn`` on the sources upcast to ``compute_dtype``; the result stays in ``compute_dtype``.

    Each model is upcast when the method reads it (``models`` may be a ``LazySources``), never all at
    once. ``noise`` is passed to random methods only (``method.random``); ``weights`` (one per model,
    None = the method's default, all 1) to weighted methods only.

    Raises ``MergeError`` naming the method and ``key`` for sources that cannot be merged (missing
    base, wrong count, different shapes, non-float), weights the method does not take or of the
    wrong count, and for a result with NaN/Inf values.
    """
    _check_sources(method, models, base, key=key)
    _check_weights(method, weights, len(models), key=key)
    upcast_base = None if base is None else base.to(compute_dtype)
    result = method.fn(
        _Upcast(models, compute_dtype), upcast_base, **params, **_extras(method, noise, weights)
    )
    if not all_finite(result):
        raise _non_finite_result(method, key, params)
    return result


def _extras(
    method: MergeMethod, noise: object, weights: Sequence[float] | None, *, noise_name: str = "noise"
) -> dict[str, object]:
    """The keywords beyond the parameters: noise for random methods (as ``noise_name``: a run of keys
    takes ``noises``, one per key), weights for weighted ones."""
    extras: dict[str, object] = {noise_name: noise} if method.random else {}
    if weights is not None:
        extras["weights"] = [float(weight) for weight in weights]
    return extras


def _check_weights(method: MergeMethod, weights: Sequence[float] | None, count: int, *, key: str) -> None:
    if weights is None:
        return
    where = f"merge method '{method.name}', tensor '{key}'"
    if not method.weighted:
        raise MergeError(f"{where}: takes no per-model weights, got {list(weights)}; remove them")
    if len(weights) != count:
        raise MergeError(f"{where}: needs one weight per non-base model ({count}), got {list(weights)}")
    if not all(math.isfinite(weight) for weight in weights):
        raise MergeError(f"{where}: weights must be finite numbers, got {list(weights)}")


def _non_finite_result(method: MergeMethod, key: str, params: Mapping[str, float]) -> MergeError:
    shown = ", ".join(f"{name}={value:g}" for name, value in params.items())
    return MergeError(
        f"merge method '{method.name}' produced NaN/Inf values for tensor '{key}' ({shown}); "
        "check the sources for NaN/Inf, try smaller parameters, or export in a wider dtype"
    )


def default_chunk_numel(device: torch.device) -> int:
    """Elements per chunk of an element-wise merge: 1 Mi on CPU (the chunk stays in cache), else 32 Mi."""
    return 1 << 20 if device.type == "cpu" else 1 << 25


def merge_into(
    out: Tensor,
    method: MergeMethod,
    models: Sequence[Tensor],
    base: Tensor | None,
    *,
    key: str,
    params: Mapping[str, float],
    noise: Noise | None,
    weights: Sequence[float] | None = None,
    compute_dtype: torch.dtype = torch.float32,
    chunk_numel: int | None = None,
    source_magnitude: float | None = None,
) -> None:
    """``out`` ← ``merge_tensor(...)`` cast to ``out.dtype``, bit for bit, without whole-tensor temporaries.

    The cheapest exact path is taken: a method's fused ``inplace`` op when every tensor already has
    ``out``'s dtype (weighted sum: one ``lerp``); else its ``stored_into`` on the sources' stored views
    (lazily read sources on the CPU: the export's), one pass into ``out``; else, for element-wise
    methods on loaded sources,
    ``chunk_numel`` elements at a time through one compute-dtype scratch buffer (``compute_into``, or
    the method on the upcast chunk), which is exact because no element depends on another; else the
    method on the whole tensor (always for ``LazySources``: each chunk would load every model again).
    ``out`` is checked for NaN/Inf after the cast, so an overflow to fp16 is caught too, unless
    ``source_magnitude`` (max |x| over the finite sources) and the method's ``growth`` bound prove the
    result finite.
    """
    _check_sources(method, models, base, key=key)
    _check_weights(method, weights, len(models), key=key)
    shape = _layout(models)[0][0]
    if out.shape != shape:
        raise MergeError(f"tensor '{key}': output shape {tuple(out.shape)} != source shape {tuple(shape)}")
    dtypes = {dtype for _, dtype in _layout(models)} | ({base.dtype} if base is not None else set())
    if method.inplace is not None and compute_dtype == torch.float32 and dtypes == {out.dtype}:
        method.inplace(out, models, base, **params)
    elif _merged_as_stored(out, method, models, base, params, noise, weights, compute_dtype):
        pass
    elif method.elementwise and not method.random and not isinstance(models, LazySources):
        _merge_elementwise_chunks(out, method, models, base, params, weights, compute_dtype, chunk_numel)
    else:
        result = merge_tensor(
            method,
            models,
            base,
            key=key,
            params=params,
            noise=noise,
            weights=weights,
            compute_dtype=compute_dtype,
        )
        out.copy_(result)
    if not result_is_surely_finite(method, params, out.dtype, source_magnitude) and not all_finite(out):
        raise _non_finite_result(method, key, params)


def _merged_as_stored(
    out: Tensor,
    method: MergeMethod,
    models: Sequence[Tensor],
    base: Tensor | None,
    params: Mapping[str, float],
    noise: Noise | None,
    weights: Sequence[float] | None,
    compute_dtype: torch.dtype,
) -> bool:
    """The method's ``stored_into`` ran on the models' stored views (lazily read sources that know
    them, on the CPU) and merged ``out``; False when there is none or it could not. A method that
    is not element-wise takes loaded CPU tensors (the live engine's) the same way, so that the live
    weights and the export come from one computation (Model Stock's float64 sums in one order)."""
    if method.stored_into is None or compute_dtype != torch.float32 or out.device.type != "cpu":
        return False
    views = stored_views(models)
    if views is None and not method.elementwise and not isinstance(models, _OnAccess):
        views = list(models)  # loaded tensors: ``stored_into`` declines those it does not take
    return views is not None and method.stored_into(
        out, views, base, **params, **_extras(method, noise, weights)
    )


def merge_run_into(
    out: Tensor,
    method: MergeMethod,
    models: Sequence[Tensor],
    base: Tensor | None,
    *,
    keys: Sequence[str],
    sizes: Sequence[int],
    params: Mapping[str, float],
    seed: int,
    weights: Sequence[float] | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> bool:
    """``merge_into`` of each of ``keys``, laid back to back in flat stored views (``out``, ``models``,
    ``base``; key j: ``sizes[j]`` elements, its noise ``noise_for(keys[j], seed)``), in one call of
    the method's ``stored_run_into``: the same bits as key by key. False (``out`` partly written)
    when the method has none or it cannot, or the base or the result holds NaN/Inf: the caller then
    merges key by key, which names the key and the source."""
    if method.stored_run_into is None or compute_dtype != torch.float32 or out.device.type != "cpu":
        return False
    _check_weights(method, weights, len(models), key=keys[0])
    if base is not None and not all_finite(base):
        return False
    noises = [noise_for(key, seed) for key in keys] if method.random else None
    extras = _extras(method, noises, weights, noise_name="noises")
    merged = method.stored_run_into(out, models, base, sizes=sizes, **params, **extras)
    return merged and all_finite(out)


def _merge_elementwise_chunks(
    out: Tensor,
    method: MergeMethod,
    models: Sequence[Tensor],
    base: Tensor | None,
    params: Mapping[str, float],
    weights: Sequence[float] | None,
    compute_dtype: torch.dtype,
    chunk_numel: int | None,
) -> None:
    flat_out = out.view(-1)
    flat_models = [model.reshape(-1) for model in models]  # views of loaded tensors
    flat_base = None if base is None else base.reshape(-1)
    total = flat_out.numel()
    chunk = min(total, chunk_numel or default_chunk_numel(out.device))
    scratch = torch.empty(chunk, dtype=compute_dtype, device=out.device) if method.compute_into else None
    extras = _extras(method, None, weights)  # not random: no noise
    for start in range(0, total, chunk):
        part = slice(start, min(total, start + chunk))
        chunk_models = [model[part] for model in flat_models]
        chunk_base = None if flat_base is None else flat_base[part]
        if scratch is not None and method.compute_into is not None:
            result = scratch[: part.stop - start]
            method.compute_into(result, chunk_models, chunk_base, **params)
        else:
            upcast_base = None if chunk_base is None else chunk_base.to(compute_dtype)
            result = method.fn(_Upcast(chunk_models, compute_dtype), upcast_base, **params, **extras)
        flat_out[part].copy_(result)


def _check_sources(method: MergeMethod, models: Sequence[Tensor], base: Tensor | None, *, key: str) -> None:
    """Base, count, one shape and float dtypes, from the sources' metadata (``LazySources``: its
    header values; nothing is loaded or copied)."""
    where = f"merge method '{method.name}', tensor '{key}'"
    if method.needs_base and base is None:
        raise MergeError(f"{where}: needs a base model (C), none was given")
    count, low, high = len(models), method.min_models, method.max_models
    if count < low or (high is not None and count > high):
        wanted = f"{low}" if high == low else f"at least {low}" if high is None else f"{low} to {high}"
        raise MergeError(f"{where}: takes {wanted} non-base models, got {count}")
    layout = [*_layout(models), *([] if base is None else [(base.shape, base.dtype)])]
    shapes = {tuple(shape) for shape, _ in layout}
    if len(shapes) > 1:
        raise MergeError(
            f"{where}: sources have different shapes {sorted(shapes)}; they are not one architecture"
        )
    dtypes = {dtype for _, dtype in layout if not dtype.is_floating_point}
    if dtypes:
        raise MergeError(
            f"{where}: {sorted(map(str, dtypes))} is not a float dtype; such tensors are copied, not merged"
        )
