"""Recipes for the tools people already run: supermerger (A1111/Forge) and sd-mecha."""

from automerge.interop._blocks import block_alphas
from automerge.interop.mecha import mecha_recipe
from automerge.interop.supermerger import SupermergerRecipe, parse_mbw_weights, supermerger_recipe

FORMATS = ("supermerger", "mecha")
"""The recipe formats for other tools (``automerge export --format``)."""

__all__ = [
    "FORMATS",
    "SupermergerRecipe",
    "block_alphas",
    "mecha_recipe",
    "parse_mbw_weights",
    "supermerger_recipe",
]
