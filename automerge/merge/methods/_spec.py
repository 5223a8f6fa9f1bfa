"""What a merge method is: a pure tensor function whose signature is its parameter spec.

A method function has the signature
``fn(models, base, *, <param>: Annotated[float, Param(low, high, doc)] = default, ...) -> Tensor``:
``models`` = [A, B, ...] (the non-base sources in order: any ``Sequence``, possibly lazy, which
loads a tensor on each access, so N-model methods stream over it holding O(1) tensors), ``base`` =
C or None, all of one float dtype and shape; it returns a new tensor of that dtype and shape and
never modifies or returns an input. Integer parameters are ``Annotated[int, Param(...)]``. Two
keywords are not parameters: a method is random exactly when it takes ``noise: Noise`` (its draws,
keyed by the recipe's seed and the tensor key), and weighted exactly when it takes
``weights: Sequence[float] | None = None`` (one weight per non-base model in model order, None = all
1). ``register_method`` derives the ``ParamSpec``s from the signature (as sd-mecha does with typed
parameters), so defaults and ranges are written once; the function's first docstring line is the
formula shown to users.
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from torch import Tensor

from automerge.merge.methods._task_core import Noise
from automerge.registry import Registry

_NOISE = "noise"
_WEIGHTS = "weights"
_WEIGHTS_ANNOTATION = Sequence[float] | None


@dataclass(frozen=True)
class Param:
    """A method parameter's range [low, high] (inclusive, None = unbounded) and its one-line doc,
    attached to its type: ``Annotated[float, Param(0.0, 1.0, "share of B")]``."""

    low: float | None = None
    high: float | None = None
    doc: str = ""


@dataclass(frozen=True)
class ParamSpec:
    """One float parameter of a merge method; the range [low, high] is inclusive, None = unbounded.

    ``default`` None makes the parameter required; ``integer`` parameters take whole numbers only.
    """

    name: str
    default: float | None
    low: float | None
    high: float | None
    doc: str
    integer: bool = False

    def __post_init__(self) -> None:
        if self.low is not None and self.high is not None and self.low > self.high:
            raise TypeError(f"parameter '{self.name}': low {self.low} > high {self.high}")
        if self.default is not None and self.check(self.default) is not None:
            raise TypeError(f"parameter '{self.name}': default {self.check(self.default)}")

    def range_text(self) -> str:
        """``[0, 1]``, ``[0, inf)``, ``(-inf, 2]`` or ``(-inf, inf)``."""
        low = "(-inf" if self.low is None else f"[{self.low:g}"
        high = "inf)" if self.high is None else f"{self.high:g}]"
        return f"{low}, {high}"

    def check(self, value: float) -> str | None:
        """Why ``value`` is not allowed (``must be in [0, 1], got 1.3``), or None when it is."""
        if not math.isfinite(value):
            return f"must be a finite number, got {value}"
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            return f"must be in {self.range_text()}, got {_number_text(value)}"
        if self.integer and value != int(value):
            return f"must be a whole number, got {_number_text(value)}"
        return None


def _number_text(value: float) -> str:
    """``1.3``, ``2``, ``1e-09``: short, but never rounded away from the value the user wrote."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: the pure function and what the config layer needs to know."""

    name: str
    fn: Callable[..., Tensor]
    params: tuple[ParamSpec, ...]
    needs_base: bool  # the base model C is required
    min_models: int  # number of non-base models
    max_models: int | None  # None = any number
    random: bool  # takes ``noise: Noise``
    weighted: bool  # takes ``weights``: one weight per non-base model
    formula: str  # one line, shown in `automerge methods` and the docs
    elementwise: bool = False  # each output element depends only on the same element of the inputs
    # Optional fast paths; each must give exactly what ``fn`` gives (see ``merge_into``):
    # inplace(out, models, base, **params): one fused pass, every tensor already in out's dtype;
    # compute_into(out, models, base, **params): out in the compute dtype, sources in any float
    # dtype, read without upcast copies (element-wise methods, one chunk at a time).
    inplace: Callable[..., None] | None = None
    compute_into: Callable[..., None] | None = None
    # stored_into(out, models, base, **params[, weights][, noise]) -> bool: the merge straight from the
    # sources as stored (views of their files on the CPU, in their own dtype, not checked for NaN/Inf)
    # into out, rounded once; False when it cannot (the general path then runs; out may be written).
    stored_into: Callable[..., bool] | None = None
    # stored_run_into(out, models, base, *, sizes, noises, **params[, weights]) -> bool: stored_into of
    # each key of a run of keys laid back to back in flat views (key j: sizes[j] elements, its draws
    # noises[j] for a random method), the same bits as key by key, in one call.
    stored_run_into: Callable[..., bool] | None = None
    # growth(**params) = g with |result| ≤ g·max|source| element-wise (finite sources); lets the
    # engine and the export skip the output's NaN/Inf check when g·max|source| fits the dtype.
    growth: Callable[..., float] | None = None

    def param_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.params)

    def defaults(self) -> dict[str, float]:
        """The parameters that have defaults, at their defaults."""
        return {spec.name: spec.default for spec in self.params if spec.default is not None}

    @classmethod
    def from_function(
        cls,
        fn: Callable[..., Tensor],
        *,
        name: str,
        needs_base: bool,
        min_models: int = 2,
        max_models: int | None = 2,
        elementwise: bool = False,
        inplace: Callable[..., None] | None = None,
        compute_into: Callable[..., None] | None = None,
        stored_into: Callable[..., bool] | None = None,
        stored_run_into: Callable[..., bool] | None = None,
        growth: Callable[..., float] | None = None,
    ) -> MergeMethod:
        """``fn`` with its ``ParamSpec``s, randomness and weights derived from its signature; a
        declaration that cannot be derived, or inconsistent metadata, is a ``TypeError``."""
        where = f"merge method '{name}' ({_qualified_name(fn)})"
        params, random, weighted = _derive_params(fn, where=where)
        doc = inspect.getdoc(fn)
        if not doc:
            raise TypeError(f"{where}: the docstring's first line must give the formula")
        if (inplace or compute_into) and not elementwise:
            raise TypeError(f"{where}: inplace and compute_into need an element-wise method")
        if max_models is not None and max_models < min_models:
            raise TypeError(f"{where}: max_models {max_models} < min_models {min_models}")
        return cls(
            name=name,
            fn=fn,
            params=params,
            needs_base=needs_base,
            min_models=min_models,
            max_models=max_models,
            random=random,
            weighted=weighted,
            formula=doc.splitlines()[0],
            elementwise=elementwise,
            inplace=inplace,
            compute_into=compute_into,
            stored_into=stored_into,
            stored_run_into=stored_run_into,
            growth=growth,
        )


METHODS: Registry[MergeMethod] = Registry("merge method")


def register_method(
    name: str,
    *,
    needs_base: bool,
    min_models: int = 2,
    max_models: int | None = 2,
    elementwise: bool = False,
    inplace: Callable[..., None] | None = None,
    compute_into: Callable[..., None] | None = None,
    stored_into: Callable[..., bool] | None = None,
    stored_run_into: Callable[..., bool] | None = None,
    growth: Callable[..., float] | None = None,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator: derive ``fn``'s parameters from its signature and register it in ``METHODS``."""

    def wrap(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        method = MergeMethod.from_function(
            fn,
            name=name,
            needs_base=needs_base,
            min_models=min_models,
            max_models=max_models,
            elementwise=elementwise,
            inplace=inplace,
            compute_into=compute_into,
            stored_into=stored_into,
            stored_run_into=stored_run_into,
            growth=growth,
        )
        METHODS.register(name, method)
        return fn

    return wrap


def _derive_params(fn: Callable[..., Tensor], *, where: str) -> tuple[tuple[ParamSpec, ...], bool, bool]:
    """(the ``ParamSpec`` of each keyword parameter in order, whether ``fn`` takes noise, whether it
    takes per-model weights)."""
    signature = _signature(fn, where=where)
    parameters = list(signature.parameters.values())
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    variadic = [p.name for p in parameters if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if positional != ["models", "base"] or variadic:
        raise TypeError(
            f"{where}: must take (models, base, *, <param>: Annotated[float, Param(...)] = default, ...), "
            f"takes {signature}"
        )
    keywords = {p.name: p for p in parameters if p.kind is p.KEYWORD_ONLY}
    if _NOISE in keywords:
        _check_noise(keywords[_NOISE], where=where)
    if _WEIGHTS in keywords:
        _check_weights(keywords[_WEIGHTS], where=where)
    specs = tuple(_param_spec(p, where=where) for n, p in keywords.items() if n not in (_NOISE, _WEIGHTS))
    return specs, _NOISE in keywords, _WEIGHTS in keywords


def _signature(fn: Callable[..., Tensor], *, where: str) -> inspect.Signature:
    """``fn``'s signature with its string annotations evaluated (modules use postponed annotations)."""
    try:
        return inspect.signature(fn, eval_str=True)
    except NameError as error:
        raise TypeError(f"{where}: cannot evaluate its annotations ({error})") from None


def _check_noise(parameter: inspect.Parameter, *, where: str) -> None:
    if parameter.annotation is not Noise or parameter.default is not parameter.empty:
        raise TypeError(
            f"{where}: a random method takes `noise: Noise` without a default "
            f"(the engine gives one per key, see noise_for), got `{parameter}`"
        )


def _check_weights(parameter: inspect.Parameter, *, where: str) -> None:
    if parameter.annotation != _WEIGHTS_ANNOTATION or parameter.default is not None:
        raise TypeError(
            f"{where}: a weighted method takes `weights: Sequence[float] | None = None` "
            f"(None: every model weighs 1), got `{parameter}`"
        )


def _param_spec(parameter: inspect.Parameter, *, where: str) -> ParamSpec:
    """The ``ParamSpec`` of ``<name>: Annotated[float | int, Param(low, high, doc)] = default``."""
    kind, param = _annotated_param(parameter.annotation)
    if param is None:
        raise TypeError(
            f"{where}: parameter '{parameter.name}' needs a type Annotated[float, Param(low, high, doc)] "
            f"(or Annotated[int, ...]), got {_annotation_text(parameter.annotation)}"
        )
    default = None if parameter.default is parameter.empty else parameter.default
    if default is not None and (isinstance(default, bool) or not isinstance(default, int | float)):
        raise TypeError(f"{where}: parameter '{parameter.name}' has a non-numeric default {default!r}")
    try:
        return ParamSpec(
            name=parameter.name,
            default=_as_float(default),
            low=_as_float(param.low),
            high=_as_float(param.high),
            doc=param.doc,
            integer=kind is int,
        )
    except TypeError as error:
        raise TypeError(f"{where}: {error}") from None


def _annotated_param(annotation: Any) -> tuple[type | None, Param | None]:
    """(float or int, its ``Param``) for ``Annotated[float | int, Param(...)]``, else (None, None)."""
    if typing.get_origin(annotation) is not Annotated:
        return None, None
    kind, *metadata = typing.get_args(annotation)
    params = [item for item in metadata if isinstance(item, Param)]
    if kind not in (float, int) or len(params) != 1:
        return None, None
    return kind, params[0]


def _annotation_text(annotation: Any) -> str:
    return "no annotation" if annotation is inspect.Parameter.empty else repr(annotation)


def _as_float(value: float | None) -> float | None:
    return None if value is None else float(value)


def _qualified_name(fn: Callable[..., Any]) -> str:
    """``module.function`` for functions, the ``repr`` for configured callables (instances)."""
    qualname = getattr(fn, "__qualname__", None)
    return f"{fn.__module__}.{qualname}" if qualname else repr(fn)


def require_noise(noise: Noise | None, *, method: str) -> Noise:
    """Random methods draw only from the noise they are given, never from global state."""
    if noise is None:
        raise ValueError(f"merge method '{method}' is random and needs a Noise (see noise_for)")
    return noise


def model_weights(weights: Sequence[float] | None, count: int, *, method: str) -> list[float]:
    """The per-model weights as floats (None: all 1); a count other than ``count`` is a ``ValueError``."""
    if weights is None:
        return [1.0] * count
    if len(weights) != count:
        raise ValueError(f"merge method '{method}' got {len(weights)} weights for {count} models")
    return [float(weight) for weight in weights]


MULTI_PASS_BYTES = 16 << 20
"""A method that passes over its models more than once holds them (or what it derives from each, e.g.
TIES's kept deltas) between passes when all N together take at most this (16 MiB): small keys are
then read and derived once; above it, each pass reads again, so memory does not grow with N."""


def fits_between_passes(count: int, shape: Sequence[int], dtype: torch.dtype) -> bool:
    """True when ``count`` tensors of ``shape`` and ``dtype`` take ≤ ``MULTI_PASS_BYTES``."""
    return count * math.prod(shape) * dtype.itemsize <= MULTI_PASS_BYTES


def held_if_small(models: Sequence[Tensor]) -> Sequence[Tensor]:
    """``models`` as a list of loaded tensors when they fit between passes, else ``models`` itself (a
    lazy sequence, which knows its ``shape`` and ``dtype`` without loading, stays lazy)."""
    like = models if hasattr(models, "shape") and hasattr(models, "dtype") else models[0]
    return list(models) if fits_between_passes(len(models), like.shape, like.dtype) else models
