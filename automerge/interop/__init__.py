"""Recipes for the tools people already run: supermerger (A1111/Forge) for now."""

from automerge.interop.supermerger import SupermergerRecipe, parse_mbw_weights, supermerger_recipe

__all__ = ["SupermergerRecipe", "parse_mbw_weights", "supermerger_recipe"]
