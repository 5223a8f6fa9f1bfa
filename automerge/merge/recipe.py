"""Recipe files (``automerge merge RECIPE.yaml``; the ``recipe.yaml`` a study exports).

A recipe names its sources by letter: ``a`` (primary: its key names, layout and unmerged tensors are
kept), ``b``, then ``c`` — the base for methods that need one — and ``d``, ``e``, ... for methods over
many models. ``params`` gives each method parameter as one number or a per-block map
(``merge/params.py``). ``plan_merge`` (``merge/plan.py``) turns a recipe into a checked ``MergePlan``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from automerge.config import FileRef, Schema, parse_file, parse_model
from automerge.dtypes import ComputeDtypeName, DtypeName

MODEL_LETTER = re.compile(r"[a-z]")


def check_model_letters(models: dict[str, Path]) -> dict[str, Path]:
    """Models named a, b, c, ... (a and b required), sorted by letter; ``ValueError`` otherwise."""
    for name in models:
        if not MODEL_LETTER.fullmatch(name):
            raise ValueError(f"model names are single letters a, b, c, ...; got '{name}'")
    for required in ("a", "b"):
        if required not in models:
            raise ValueError(f"model '{required}' is required (a = primary, b = secondary, c = base)")
    return dict(sorted(models.items()))


class Recipe(Schema):
    """A recipe file: which models, which method, which (per-block) parameters."""

    models: dict[str, FileRef] = Field(description="a, b, c (base), d, ...: checkpoint paths")
    method: str
    params: dict[str, float | dict[str, float]] = Field(default_factory=dict)
    seed: int = Field(0, ge=0, description="seeds random methods per tensor key")
    dtype: DtypeName = "fp16"
    compute_dtype: ComputeDtypeName = "fp32"

    @field_validator("models")
    @classmethod
    def _model_letters(cls, models: dict[str, Path]) -> dict[str, Path]:
        return check_model_letters(models)

    def to_yaml_dict(self, *, model_path: Callable[[Path], str] = str) -> dict[str, Any]:
        """The recipe as plain data, each model path written by ``model_path`` (e.g. relative to the
        folder of the recipe file, or the bare file name for a checkpoint header)."""
        data = self.model_dump(mode="json")
        data["models"] = {name: model_path(path) for name, path in self.models.items()}
        return data


def load_recipe(path: Path | str) -> Recipe:
    """Read and validate a recipe file (model paths relative to it)."""
    return parse_file(Recipe, Path(path))


def recipe_from_data(data: Any, *, source: str, base_dir: Path | None = None) -> Recipe:
    """Validate recipe data that did not come from a file (errors name ``source``)."""
    return parse_model(Recipe, data, source=source, base_dir=base_dir)
