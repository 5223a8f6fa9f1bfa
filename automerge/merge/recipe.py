"""Recipe files (``automerge merge RECIPE.yaml``; the ``recipe.yaml`` a study exports).

A recipe names its sources by letter: ``a`` (primary: its key names, layout and unmerged tensors are
kept), ``b``, then ``c`` — the base for methods that need one — and ``d``, ``e``, ... for methods over
many models. ``params`` gives each method parameter as one number or a per-block map
(``merge/params.py``). ``plan_merge`` (``merge/plan.py``) turns a recipe into a checked ``MergePlan``.

A model may be a checkpoint with LoRAs applied: ``a: {checkpoint: base.safetensors, loras: [{path:
style.safetensors, strength: 0.8}]}``; each LoRA is named (default: its file's stem) so that a study can
search its strength as ``lora.NAME``. Files are read as entries of ``models`` and kept as two fields:
``models`` (letter → checkpoint path) and ``loras`` (letter → its LoRAs, applied in order).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from automerge.config import FileRef, Schema, parse_file, parse_model
from automerge.dtypes import ComputeDtypeName, DtypeName

MODEL_LETTER = re.compile(r"[a-z]")
LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
LORA_STRENGTH_LIMIT = 10.0  # |strength| of a LoRA, fixed or searched


class LoraEntry(Schema):
    """One LoRA applied to a model: ``strength`` × its delta (the ``alpha``/rank scale as its format
    states it); ``name`` (default: the file's stem) is how a study searches it (``lora.NAME``)."""

    path: FileRef
    strength: float = Field(
        1.0, ge=-LORA_STRENGTH_LIMIT, le=LORA_STRENGTH_LIMIT, description="multiplier of the LoRA's delta"
    )
    name: str = ""

    @model_validator(mode="after")
    def _named(self) -> LoraEntry:
        if not self.name:
            object.__setattr__(self, "name", re.sub(r"[^A-Za-z0-9_-]", "_", self.path.stem) or "lora")
        if not LORA_NAME.fullmatch(self.name):
            raise ValueError(
                f"LoRA name '{self.name}' must be letters, digits, _ and - (it is searched as lora.NAME)"
            )
        return self


def lift_model_entries(data: Any) -> Any:
    """``models: {a: {checkpoint: P, loras: [...]}}`` → ``models: {a: P}`` and ``loras: {a: [...]}``
    (a plain path stays as it is); the two forms may be mixed across models."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        return data
    models, loras = {}, dict(data.get("loras") or {})
    for letter, entry in data["models"].items():
        if isinstance(entry, dict) and ("checkpoint" in entry or "loras" in entry):
            unknown = sorted(set(entry) - {"checkpoint", "loras"})
            if unknown or "checkpoint" not in entry:
                raise ValueError(
                    f"models.{letter}: a model with LoRAs is {{checkpoint: PATH, loras: [{{path: PATH, "
                    f"strength: 1.0}}]}}; "
                    + (f"unknown key {unknown[0]}" if unknown else "checkpoint is missing")
                )
            models[letter] = entry["checkpoint"]
            if entry.get("loras"):
                if letter in loras:
                    raise ValueError(
                        f"models.{letter}: its LoRAs are given twice (here and in loras.{letter})"
                    )
                loras[letter] = entry["loras"]
        else:
            models[letter] = entry
    return {**data, "models": models, **({"loras": loras} if loras else {})}


def check_lora_names(
    loras: dict[str, list[LoraEntry]], models: dict[str, Path]
) -> dict[str, list[LoraEntry]]:
    """Every letter names a model and every LoRA name is unique across the models."""
    seen: dict[str, str] = {}
    for letter, entries in loras.items():
        if letter not in models:
            raise ValueError(f"loras.{letter}: there is no model '{letter}'")
        for entry in entries:
            if entry.name in seen:
                raise ValueError(
                    f"two LoRAs are named '{entry.name}' (models {seen[entry.name]} and {letter}); "
                    "give one of them another name: {path: ..., name: other}"
                )
            seen[entry.name] = letter
    return loras


def model_entries_yaml(
    models: dict[str, Path], loras: dict[str, list[LoraEntry]], *, model_path: Callable[[Path], str]
) -> dict[str, Any]:
    """``models`` as a file writes them: a path, or ``{checkpoint, loras}`` for a model with LoRAs."""
    written: dict[str, Any] = {}
    for letter, path in models.items():
        if loras.get(letter):
            written[letter] = {
                "checkpoint": model_path(path),
                "loras": [
                    {"path": model_path(e.path), "strength": e.strength, "name": e.name}
                    for e in loras[letter]
                ],
            }
        else:
            written[letter] = model_path(path)
    return written


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
    loras: dict[str, list[LoraEntry]] = Field(
        default_factory=dict, description="per model letter, LoRAs applied to it (from models.X.loras)"
    )
    method: str
    params: dict[str, float | dict[str, float]] = Field(default_factory=dict)
    seed: int = Field(0, ge=0, description="seeds random methods per tensor key")
    dtype: DtypeName = "fp16"
    compute_dtype: ComputeDtypeName = "fp32"

    @model_validator(mode="before")
    @classmethod
    def _entries(cls, data: Any) -> Any:
        return lift_model_entries(data)

    @field_validator("models")
    @classmethod
    def _model_letters(cls, models: dict[str, Path]) -> dict[str, Path]:
        return check_model_letters(models)

    @model_validator(mode="after")
    def _lora_names(self) -> Recipe:
        check_lora_names(self.loras, self.models)
        return self

    def to_yaml_dict(self, *, model_path: Callable[[Path], str] = str) -> dict[str, Any]:
        """The recipe as plain data, each model path written by ``model_path`` (e.g. relative to the
        folder of the recipe file, or the bare file name for a checkpoint header)."""
        data = self.model_dump(mode="json", exclude={"loras"})
        data["models"] = model_entries_yaml(self.models, self.loras, model_path=model_path)
        return data


def load_recipe(path: Path | str) -> Recipe:
    """Read and validate a recipe file (model paths relative to it)."""
    return parse_file(Recipe, Path(path))


def recipe_from_data(data: Any, *, source: str, base_dir: Path | None = None) -> Recipe:
    """Validate recipe data that did not come from a file (errors name ``source``)."""
    return parse_model(Recipe, data, source=source, base_dir=base_dir)
