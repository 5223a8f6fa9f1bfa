"""Recipes for the tools people already run: supermerger (A1111/Forge), sd-mecha and ComfyUI."""

from automerge.interop._blocks import block_alphas
from automerge.interop.comfyui import ComfyWorkflow, comfyui_workflow
from automerge.interop.mecha import mecha_recipe
from automerge.interop.supermerger import SupermergerRecipe, parse_mbw_weights, supermerger_recipe

FORMATS = ("supermerger", "mecha", "comfyui")
"""The recipe formats for other tools (``automerge export --format``)."""

__all__ = [
    "FORMATS",
    "ComfyWorkflow",
    "SupermergerRecipe",
    "block_alphas",
    "comfyui_workflow",
    "mecha_recipe",
    "parse_mbw_weights",
    "supermerger_recipe",
]
