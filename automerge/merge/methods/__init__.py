"""Merge methods: pure tensor functions with metadata, in the ``METHODS`` registry.

A new method is one function in one file whose signature is its spec,
``fn(models, base, *, alpha: Annotated[float, Param(0.0, 1.0, "doc")] = 0.5)``, decorated with
``register_method`` (which derives its ``ParamSpec``s at import time), plus one line in the import
list below. Variants of one algorithm are configured instances (``task_arithmetic.TaskArithmetic``).
"""

# The built-in methods: each module registers its methods in METHODS when imported.
from automerge.merge.methods import (  # noqa: F401
    difference,
    geometric_median,
    interpolation,
    model_stock,
    task_arithmetic,
)
from automerge.merge.methods._apply import (
    all_finite,
    check_finite,
    generator_for,
    max_magnitude,
    merge_into,
    merge_tensor,
)
from automerge.merge.methods._spec import METHODS, MergeMethod, Param, ParamSpec, register_method

__all__ = [
    "METHODS",
    "MergeMethod",
    "Param",
    "ParamSpec",
    "all_finite",
    "check_finite",
    "generator_for",
    "max_magnitude",
    "merge_into",
    "merge_tensor",
    "register_method",
]
