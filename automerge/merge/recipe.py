"""Merge recipes (``automerge merge RECIPE.yaml``) and the validated ``MergePlan`` built from one.

A recipe names its sources by letter: ``a`` (primary: its key names, layout and unmerged tensors are
kept), ``b``, then ``c`` — the base for methods that need one — and ``d``, ``e``, ... for methods over
many models. Everything is checked (method, parameters per block, families, shapes) before any
tensor is merged or any file written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from automerge.arch import Architecture
from automerge.checkpoints.model import SourceModel, open_model
from automerge.config import FileRef, Schema, parse_file, parse_model
from automerge.errors import ConfigError, MergeError
from automerge.merge.methods import METHODS, MergeMethod
from automerge.merge.params import BlockParams, resolve_params

BASE_NAME = "c"
DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
COMPUTE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp64": torch.float64}
_MODEL_NAME = re.compile(r"[a-z]")

DtypeName = Literal["fp16", "bf16", "fp32"]


class Recipe(Schema):
    """A recipe file: which models, which method, which (per-block) parameters."""

    models: dict[str, FileRef] = Field(description="a, b, c (base), d, ...: checkpoint paths")
    method: str
    params: dict[str, float | dict[str, float]] = Field(default_factory=dict)
    seed: int = Field(0, ge=0, description="seeds random methods per tensor key")
    dtype: DtypeName = "fp16"
    compute_dtype: Literal["fp32", "fp64"] = "fp32"

    @field_validator("models")
    @classmethod
    def _model_names(cls, models: dict[str, Path]) -> dict[str, Path]:
        for name in models:
            if not _MODEL_NAME.fullmatch(name):
                raise ValueError(f"model names are single letters a, b, c, ...; got '{name}'")
        for required in ("a", "b"):
            if required not in models:
                raise ValueError(f"model '{required}' is required (a = primary, b = secondary, c = base)")
        return dict(sorted(models.items()))

    def to_yaml_dict(self) -> dict[str, Any]:
        """The recipe as plain data (paths as strings), for recipe.yaml and file metadata."""
        data = self.model_dump(mode="json")
        data["models"] = {name: str(path) for name, path in self.models.items()}
        return data


def load_recipe(path: Path | str) -> Recipe:
    return parse_file(Recipe, Path(path))


def recipe_from_data(data: Any, *, source: str, base_dir: Path | None = None) -> Recipe:
    return parse_model(Recipe, data, source=source, base_dir=base_dir)


@dataclass
class MergePlan:
    """A checked merge: open sources, their family, the method and resolved per-block parameters."""

    recipe: Recipe
    method: MergeMethod
    arch: Architecture
    sources: Mapping[str, SourceModel]  # by letter, "a" first
    model_names: tuple[str, ...]  # the non-base models in order (a, b, d, ...)
    base_name: str | None
    params: BlockParams
    source: str  # where the recipe came from, for messages

    @property
    def primary(self) -> SourceModel:
        return self.sources["a"]

    @property
    def compute_dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.recipe.compute_dtype]

    def merged_block(self, key: str, dtype: torch.dtype) -> str | None:
        """The block ``key`` is merged in under this plan's parameters; None: copied from A."""
        block = self.arch.block_of(key, dtype)
        return block if block is not None and self.params.merges(block) else None

    def with_params(self, params: BlockParams) -> MergePlan:
        return MergePlan(
            self.recipe,
            self.method,
            self.arch,
            self.sources,
            self.model_names,
            self.base_name,
            params,
            self.source,
        )

    def close(self) -> None:
        for model in self.sources.values():
            model.close()


def method_roles(method: MergeMethod, names: list[str], *, source: str) -> tuple[tuple[str, ...], str | None]:
    """Split model letters into (non-base models, base) for ``method``; errors say what to change."""
    base = BASE_NAME if method.needs_base else None
    if method.needs_base and BASE_NAME not in names:
        raise ConfigError(
            f"{source}: method '{method.name}' needs a base model: add 'c: path/to/base.safetensors' to models"
        )
    models = tuple(name for name in names if name != base)
    if len(models) < method.min_models:
        raise ConfigError(
            f"{source}: method '{method.name}' needs at least {method.min_models} models besides the base"
        )
    if method.max_models is not None and len(models) > method.max_models:
        extra = ", ".join(models[method.max_models :])
        hint = " (it takes no base model)" if not method.needs_base and BASE_NAME in names else ""
        raise ConfigError(
            f"{source}: method '{method.name}' merges {method.max_models} models; remove {extra}{hint}"
        )
    return models, base


def plan_merge(recipe: Recipe, *, source: str) -> MergePlan:
    """Check everything about ``recipe`` and open its sources (lazily: headers only)."""
    method = METHODS.get(recipe.method, where=f"{source}: field 'method'")
    model_names, base_name = method_roles(method, list(recipe.models), source=source)
    sources: dict[str, SourceModel] = {}
    try:
        for name, path in recipe.models.items():
            sources[name] = open_model(path)
        arch = _common_arch(sources)
        params = resolve_params(method, recipe.params, blocks=arch.blocks, source=source)
        plan = MergePlan(recipe, method, arch, sources, model_names, base_name, params, source)
        check_shapes(plan)
    except BaseException:
        for model in sources.values():
            model.close()
        raise
    return plan


def _common_arch(sources: Mapping[str, SourceModel]) -> Architecture:
    families = {name: model.arch.name for name, model in sources.items()}
    if len(set(families.values())) > 1:
        shown = ", ".join(f"{name} is {family}" for name, family in families.items())
        raise MergeError(f"models of different families cannot be merged: {shown}")
    return sources["a"].arch


def check_shapes(plan: MergePlan) -> None:
    """Every merged key of A must exist with the same shape in every other source."""
    primary = plan.primary.checkpoint
    others = {name: set(model.checkpoint.keys()) for name, model in plan.sources.items() if name != "a"}
    for key in primary.keys():
        info = primary.info(key)
        if plan.merged_block(key, info.dtype) is None:
            continue
        for name, model in plan.sources.items():
            if name == "a":
                continue
            if key not in others[name]:
                raise MergeError(f"model {name} ({model.path.name}) has no tensor '{key}' that model a has")
            other = model.checkpoint.info(key).shape
            if other != info.shape:
                raise MergeError(
                    f"shape mismatch for '{key}': model a has {list(info.shape)}, model {name} has {list(other)}; "
                    "these checkpoints are not of the same architecture size"
                )
