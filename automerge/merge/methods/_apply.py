"""Running one merge method on one tensor: checks, upcasting, per-key seeding, finiteness."""

from __future__ import annotations

import hashlib
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


def all_finite(tensor: Tensor) -> bool:
    """True when no element is NaN or ±Inf (always True for integer tensors).

    Fast path: NaN and Inf propagate through a sum, so a finite float32 (float64 for float64
    tensors) sum proves every element finite, at a fraction of ``isfinite(t).all()``'s cost. A
    non-finite sum can also come from huge finite values overflowing; then the exact test decides.
    """
    if not tensor.is_floating_point():
        return True
    accumulate = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(tensor.sum(dtype=accumulate))):
        return True
    return bool(torch.isfinite(tensor).all())


def check_finite(tensor: Tensor, *, model: str, key: str) -> None:
    """Raise ``MergeError`` when a source tensor holds NaN or Inf (it would poison the merge)."""
    if not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise MergeError(
            f"model {model}: tensor '{key}' has NaN/Inf values ({bad} of {tensor.numel()}); "
            "the checkpoint is damaged or overflowed when saved, use another copy"
        )


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

    Raises ``MergeError`` naming the method and ``key`` for sources that cannot be merged (missing
    base, wrong count, different shapes, non-float) and for a result with NaN/Inf values.
    """
    _check_sources(method, models, base, key=key)
    upcast = [model.to(compute_dtype) for model in models]
    upcast_base = None if base is None else base.to(compute_dtype)
    result = method.fn(upcast, upcast_base, generator=generator, **params)
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
) -> None:
    """``out`` ← ``merge_tensor(...)`` cast to ``out.dtype``, bit for bit, without whole-tensor temporaries.

    The cheapest exact path is taken: a method's fused ``inplace`` op when every tensor already has
    ``out``'s dtype (weighted sum: one ``lerp``); else, for element-wise methods, ``chunk_numel``
    elements at a time through one compute-dtype scratch buffer (``compute_into``, or the method on
    the upcast chunk), which is exact because no element depends on another; else the method on the
    whole tensor. ``out`` is checked for NaN/Inf after the cast, so an overflow to fp16 is caught too.
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
    if not all_finite(out):
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
            result = method.fn(upcast, upcast_base, generator=None, **params)
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
