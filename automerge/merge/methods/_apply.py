"""Running one merge method on one tensor: checks, upcasting, per-key seeding, finiteness."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from automerge.errors import MergeError
from automerge.merge.methods._spec import MergeMethod


def generator_for(key: str, seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded with blake2b-64(seed, key): stable across runs and processes.

    Random methods are seeded per tensor key so a recipe always gives the same model, and the
    stream of one key does not depend on which other keys were merged before it.
    """
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest, "little"))
    return generator


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
    generator: torch.Generator | None,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``method.fn`` on the sources upcast to ``compute_dtype``; the result stays in ``compute_dtype``.

    ``generator`` is passed to random methods only (``method.random``); the others take none.

    Raises ``MergeError`` naming the method and ``key`` for sources that cannot be merged (missing
    base, wrong count, different shapes, non-float) and for a result with NaN/Inf values.
    """
    _check_sources(method, models, base, key=key)
    upcast = [model.to(compute_dtype) for model in models]
    upcast_base = None if base is None else base.to(compute_dtype)
    randomness = {"generator": generator} if method.random else {}  # only random methods take one
    result = method.fn(upcast, upcast_base, **params, **randomness)
    if not all_finite(result):
        raise _non_finite_result(method, key, params)
    return result


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
    generator: torch.Generator | None,
    compute_dtype: torch.dtype = torch.float32,
    chunk_numel: int | None = None,
    source_magnitude: float | None = None,
) -> None:
    """``out`` ← ``merge_tensor(...)`` cast to ``out.dtype``, bit for bit, without whole-tensor temporaries.

    The cheapest exact path is taken: a method's fused ``inplace`` op when every tensor already has
    ``out``'s dtype (weighted sum: one ``lerp``); else, for element-wise methods, ``chunk_numel``
    elements at a time through one compute-dtype scratch buffer (``compute_into``, or the method on
    the upcast chunk), which is exact because no element depends on another; else the method on the
    whole tensor. ``out`` is checked for NaN/Inf after the cast, so an overflow to fp16 is caught too,
    unless ``source_magnitude`` (max |x| over the finite sources) and the method's ``growth`` bound
    prove the result finite.
    """
    _check_sources(method, models, base, key=key)
    if tuple(out.shape) != tuple(models[0].shape):
        raise MergeError(
            f"tensor '{key}': output shape {tuple(out.shape)} != source shape {tuple(models[0].shape)}"
        )
    sources = [*models, *([] if base is None else [base])]
    if (
        method.inplace is not None
        and compute_dtype == torch.float32
        and all(s.dtype == out.dtype for s in sources)
    ):
        method.inplace(out, models, base, **params)
    elif method.elementwise and not method.random:
        _merge_elementwise_chunks(out, method, models, base, params, compute_dtype, chunk_numel)
    else:
        result = merge_tensor(
            method, models, base, key=key, params=params, generator=generator, compute_dtype=compute_dtype
        )
        out.copy_(result)
    if not result_is_surely_finite(method, params, out.dtype, source_magnitude) and not all_finite(out):
        raise _non_finite_result(method, key, params)


def _merge_elementwise_chunks(
    out: Tensor,
    method: MergeMethod,
    models: Sequence[Tensor],
    base: Tensor | None,
    params: Mapping[str, float],
    compute_dtype: torch.dtype,
    chunk_numel: int | None,
) -> None:
    flat_out = out.view(-1)
    flat_models = [model.reshape(-1) for model in models]
    flat_base = None if base is None else base.reshape(-1)
    total = flat_out.numel()
    chunk = min(total, chunk_numel or default_chunk_numel(out.device))
    scratch = torch.empty(chunk, dtype=compute_dtype, device=out.device) if method.compute_into else None
    for start in range(0, total, chunk):
        part = slice(start, min(total, start + chunk))
        chunk_models = [model[part] for model in flat_models]
        chunk_base = None if flat_base is None else flat_base[part]
        if scratch is not None and method.compute_into is not None:
            result = scratch[: part.stop - start]
            method.compute_into(result, chunk_models, chunk_base, **params)
        else:
            upcast = [model.to(compute_dtype) for model in chunk_models]
            upcast_base = None if chunk_base is None else chunk_base.to(compute_dtype)
            result = method.fn(upcast, upcast_base, **params)  # not random: no generator
        flat_out[part].copy_(result)


def _check_sources(method: MergeMethod, models: Sequence[Tensor], base: Tensor | None, *, key: str) -> None:
    where = f"merge method '{method.name}', tensor '{key}'"
    if method.needs_base and base is None:
        raise MergeError(f"{where}: needs a base model (C), none was given")
    count, low, high = len(models), method.min_models, method.max_models
    if count < low or (high is not None and count > high):
        wanted = f"{low}" if high == low else f"at least {low}" if high is None else f"{low} to {high}"
        raise MergeError(f"{where}: takes {wanted} non-base models, got {count}")
    sources = [*models, *([] if base is None else [base])]
    shapes = {tuple(source.shape) for source in sources}
    if len(shapes) > 1:
        raise MergeError(
            f"{where}: sources have different shapes {sorted(shapes)}; they are not one architecture"
        )
    dtypes = {source.dtype for source in sources if not source.is_floating_point()}
    if dtypes:
        raise MergeError(
            f"{where}: {sorted(map(str, dtypes))} is not a float dtype; such tensors are copied, not merged"
        )
