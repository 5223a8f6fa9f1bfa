"""Merge methods: pure tensor functions with metadata, in the ``METHODS`` registry.

A new method is one function in one file whose signature is its spec,
``fn(models, base, *, alpha: Annotated[float, Param(0.0, 1.0, "doc")] = 0.5)`` (plus ``noise: Noise``
when random, ``weights: Sequence[float] | None = None`` when weighted), decorated with
``register_method`` (which derives its ``ParamSpec``s at import time), plus one line in the import
list below. Variants of one algorithm are configured instances (``task_arithmetic.TaskArithmetic``).
"""

# The built-in methods: each module registers its methods in METHODS when imported.
from automerge.merge.methods import (  # noqa: F401
    average,
    difference,
    geometric_median,
    interpolation,
    model_stock,
    task_arithmetic,
)
from automerge.merge.methods._apply import (
    LazySources,
    all_finite,
    check_finite,
    max_magnitude,
    merge_into,
    merge_run_into,
    merge_tensor,
    noise_for,
)
from automerge.merge.methods._spec import METHODS, MergeMethod, Param, ParamSpec, register_method
from automerge.merge.methods._task_core import Noise

__all__ = [
    "METHODS",
    "LazySources",
    "MergeMethod",
    "Noise",
    "Param",
    "ParamSpec",
    "all_finite",
    "check_finite",
    "max_magnitude",
    "merge_into",
    "merge_run_into",
    "merge_tensor",
    "noise_for",
    "register_method",
]
