"""What a merge method is: a pure tensor function plus metadata, checked when it is registered.

A method function has the signature
``fn(models, base, *, generator, **params) -> Tensor``: ``models`` = [A, B, ...] (the non-base
sources in order), ``base`` = C or None, all of one float dtype and shape; it returns a new tensor of
that dtype and shape and never modifies or returns an input. Parameter defaults and ranges live in
the ``ParamSpec``s only; the function's first docstring line is the formula shown to users.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from automerge.registry import Registry


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
    random: bool  # needs a torch.Generator
    formula: str  # one line, shown in `automerge methods` and the docs
    elementwise: bool = False  # each output element depends only on the same element of the inputs
    # Optional fast paths; each must give exactly what ``fn`` gives (see ``merge_into``):
    # inplace(out, models, base, **params): one fused pass, every tensor already in out's dtype;
    # compute_into(out, models, base, **params): out in the compute dtype, sources in any float
    # dtype, read without upcast copies (element-wise methods, one chunk at a time).
    inplace: Callable[..., None] | None = None
    compute_into: Callable[..., None] | None = None
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
        params: Sequence[ParamSpec],
        needs_base: bool,
        min_models: int,
        max_models: int | None,
        random: bool,
        elementwise: bool = False,
        inplace: Callable[..., None] | None = None,
        compute_into: Callable[..., None] | None = None,
        growth: Callable[..., float] | None = None,
    ) -> MergeMethod:
        """Check ``fn`` against the declared parameters (a mismatch is a ``TypeError``) and wrap it."""
        _check_signature(fn, name=name, params=params)
        doc = inspect.getdoc(fn)
        if not doc:
            raise TypeError(f"merge method '{name}': the docstring's first line must give the formula")
        if (inplace or compute_into) and not elementwise:
            raise TypeError(f"merge method '{name}': inplace and compute_into need an element-wise method")
        if max_models is not None and max_models < min_models:
            raise TypeError(f"merge method '{name}': max_models {max_models} < min_models {min_models}")
        return cls(
            name=name,
            fn=fn,
            params=tuple(params),
            needs_base=needs_base,
            min_models=min_models,
            max_models=max_models,
            random=random,
            formula=doc.splitlines()[0],
            elementwise=elementwise,
            inplace=inplace,
            compute_into=compute_into,
            growth=growth,
        )


METHODS: Registry[MergeMethod] = Registry("merge method")


def register_method(
    name: str,
    *,
    params: Sequence[ParamSpec] = (),
    needs_base: bool,
    min_models: int = 2,
    max_models: int | None = 2,
    random: bool = False,
    elementwise: bool = False,
    inplace: Callable[..., None] | None = None,
    compute_into: Callable[..., None] | None = None,
    growth: Callable[..., float] | None = None,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator: check ``fn``'s signature against ``params`` and register it in ``METHODS``."""

    def wrap(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        method = MergeMethod.from_function(
            fn,
            name=name,
            params=params,
            needs_base=needs_base,
            min_models=min_models,
            max_models=max_models,
            random=random,
            elementwise=elementwise,
            inplace=inplace,
            compute_into=compute_into,
            growth=growth,
        )
        METHODS.register(name, method)
        return fn

    return wrap


def _check_signature(fn: Callable[..., Tensor], *, name: str, params: Sequence[ParamSpec]) -> None:
    """``fn(models, base, *, generator, <one keyword per ParamSpec, no defaults>)``."""
    sig = inspect.signature(fn)
    positional = [
        p.name
        for p in sig.parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    keyword = {p.name: p for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    variadic = [p.name for p in sig.parameters.values() if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    where = f"merge method '{name}' ({fn.__module__}.{fn.__qualname__})"
    if positional != ["models", "base"] or variadic:
        raise TypeError(f"{where}: must take (models, base, *, generator, ...), takes {sig}")
    declared = [spec.name for spec in params]
    if len(set(declared)) != len(declared) or "generator" in declared:
        raise TypeError(f"{where}: parameter names must be unique and not 'generator': {declared}")
    if set(keyword) != {"generator", *declared}:
        raise TypeError(
            f"{where}: keyword parameters {sorted(keyword)} do not match the declared "
            f"ParamSpecs {sorted(declared)} + ['generator']"
        )
    with_default = [
        p for p in keyword if p != "generator" and keyword[p].default is not inspect.Parameter.empty
    ]
    if with_default:
        raise TypeError(
            f"{where}: give defaults in the ParamSpecs only, not in the signature: {with_default}"
        )


def require_generator(generator: torch.Generator | None, *, method: str) -> torch.Generator:
    """Random methods draw only from the generator they are given, never from global state."""
    if generator is None:
        raise ValueError(f"merge method '{method}' is random and needs a torch.Generator (see generator_for)")
    return generator
