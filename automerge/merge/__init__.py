"""Merging: methods (pure tensor functions, registered), per-block parameters, recipes and the checked
``MergePlan``, the live in-place engine and the streaming export."""

from automerge.merge.engine import EngineOptions, LiveEngine
from automerge.merge.export import export_merge, merged_tensors
from automerge.merge.methods import METHODS, MergeMethod, ParamSpec, register_method
from automerge.merge.params import BlockParams, changed_blocks, resolve_params
from automerge.merge.plan import MergePlan, open_plan, plan_checkpoint, plan_merge
from automerge.merge.recipe import Recipe, load_recipe, recipe_from_data

__all__ = [
    "METHODS",
    "BlockParams",
    "EngineOptions",
    "LiveEngine",
    "MergeMethod",
    "MergePlan",
    "ParamSpec",
    "Recipe",
    "changed_blocks",
    "export_merge",
    "load_recipe",
    "merged_tensors",
    "open_plan",
    "plan_checkpoint",
    "plan_merge",
    "recipe_from_data",
    "register_method",
    "resolve_params",
]
