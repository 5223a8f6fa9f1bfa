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


def check_finite(tensor: Tensor, *, model: str, key: str) -> None:
    """Raise ``MergeError`` when a source tensor holds NaN or Inf (it would poison the merge)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
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
    if not bool(torch.isfinite(result).all()):
        shown = ", ".join(f"{name}={value:g}" for name, value in params.items())
        raise MergeError(
            f"merge method '{method.name}' produced NaN/Inf values for tensor '{key}' ({shown}); "
            "check the sources for NaN/Inf or try smaller parameters"
        )
    return result


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
