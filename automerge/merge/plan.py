"""``MergePlan``: a checked merge — open sources (headers only), their family, the method, resolved
per-block parameters, seed and dtypes — from which the live engine and the export both work.

Everything is checked (method, model roles, parameters per block, families, shapes, LoRAs against their
model) before any tensor is merged or any file written. A source with LoRAs is its checkpoint plus each
LoRA's delta times its strength (``MergePlan.load``): the export and the live engine read sources through
that one function, and the strengths live in ``params.lora_strengths``, so a trial can change them. ``plan_merge`` plans a recipe file; ``open_plan`` plans typed values (a study
uses it directly); ``plan_checkpoint`` plans one checkpoint as itself (for rendering it).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from automerge.arch import EMA_PREFIX, Architecture
from automerge.checkpoints import SourceModel, duplicate_files, open_model
from automerge.dtypes import TORCH_DTYPES, dtype_name
from automerge.errors import CheckpointError, ConfigError, MergeError
from automerge.gc_scope import long_lived_frozen
from automerge.lora import Lora, apply_loras, read_lora
from automerge.merge.methods import METHODS, MergeMethod
from automerge.merge.params import BlockParams, BlockValue, resolve_params
from automerge.merge.recipe import BASE_NAME, WEIGHT_PREFIX, LoraEntry, Recipe, model_order

log = logging.getLogger("automerge.merge")


@dataclass(frozen=True)
class MergePlan:
    """A checked merge: open sources, their family, the method and resolved per-block parameters."""

    method: MergeMethod
    arch: Architecture
    sources: Mapping[str, SourceModel]  # by name, in model order (a, b, c, ..., z, aa, ...)
    model_names: tuple[str, ...]  # the non-base models in order (a, b, d, ...)
    base_name: str | None
    params: BlockParams
    seed: int  # seeds random methods per tensor key
    dtype: torch.dtype  # of the exported checkpoint
    compute_dtype: torch.dtype  # of the merge math
    source: str  # where the plan came from, for messages
    loras: Mapping[str, tuple[tuple[str, Lora], ...]] = field(default_factory=dict)  # letter → (name, LoRA)

    @property
    def primary(self) -> SourceModel:
        return self.sources["a"]

    def merged_block(self, key: str, dtype: torch.dtype) -> str | None:
        """The block ``key`` is merged in under this plan's parameters; None: copied from A."""
        block = self.arch.block_of(key, dtype)
        return block if block is not None and self.params.merges(block) else None

    def with_params(self, params: BlockParams) -> MergePlan:
        """The same sources and method with other parameters (e.g. a trial's, LoRA strengths too)."""
        return dataclasses.replace(self, params=params)

    def load(self, name: str, key: str) -> torch.Tensor:
        """Source ``name``'s tensor ``key`` as merged: the checkpoint's as stored, or, where LoRAs adapt
        it, the checkpoint's plus Σ strength·ΔW in float32 (not rounded back to an fp16 file's dtype
        before the merge, as ComfyUI's LoraLoader → merge nodes keep it too)."""
        tensor = self.sources[name].checkpoint.load(key)
        applied = self.loras_on(name, key)
        return apply_loras(tensor.float(), key, applied) if applied else tensor

    def loras_on(self, name: str, key: str) -> list[tuple[Lora, float]]:
        """(LoRA, strength) of source ``name``'s LoRAs that adapt ``key``, in the recipe's order."""
        return [
            (lora, self.params.lora_strengths[lora_name])
            for lora_name, lora in self.loras.get(name, ())
            if key in lora.layers
        ]

    def recipe(self) -> Recipe:
        """This plan as a recipe (for recipe.yaml and the checkpoint header): planning it again gives
        the same merge."""
        strengths = self.params.lora_strengths
        return Recipe(
            models={name: model.path for name, model in self.sources.items()},
            loras={
                letter: [
                    LoraEntry(path=lora.path, strength=strengths[name], name=name) for name, lora in entries
                ]
                for letter, entries in self.loras.items()
                if entries
            },
            method=self.method.name,
            params=self.params.as_recipe(),
            seed=self.seed,
            dtype=dtype_name(self.dtype),
            compute_dtype=dtype_name(self.compute_dtype),
        )

    def close(self) -> None:
        for model in self.sources.values():
            model.close()

    def __enter__(self) -> MergePlan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def method_roles(method: MergeMethod, names: list[str], *, source: str) -> tuple[tuple[str, ...], str | None]:
    """Split model names into (non-base models in model order, base) for ``method``; errors say what
    to change."""
    names = sorted(names, key=model_order)
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


@long_lived_frozen()  # 100 sources' headers: ~15 full collector passes over ~450 K objects
def open_plan(
    models: Mapping[str, Path],
    method: str,
    *,
    params: Mapping[str, BlockValue],
    seed: int = 0,
    dtype: str = "fp16",
    compute_dtype: str = "fp32",
    loras: Mapping[str, Sequence[LoraEntry]] | None = None,
    source: str,
) -> MergePlan:
    """Check everything and open the sources (lazily: headers only) and their LoRAs (read whole:
    they are small); ``source`` names the file (and field) the values came from in every error.
    A model whose file equals an earlier model's is merged once (``_drop_duplicates``)."""
    merge_method = METHODS.get(method, where=f"{source}: field 'method'")
    model_names, base_name = method_roles(merge_method, list(models), source=source)
    opened: dict[str, SourceModel] = {}
    try:
        for name in sorted(models, key=model_order):
            opened[name] = open_model(models[name])
        arch = _common_arch(opened, source=source)
        lora_entries = loras or {}
        for name in _drop_duplicates(opened, merge_method, model_names, lora_entries, params, source=source):
            opened.pop(name).close()
        model_names = tuple(name for name in model_names if name in opened)
        read = {
            letter: tuple(
                (entry.name, _read_lora(entry, arch, opened[letter], source=source)) for entry in entries
            )
            for letter, entries in lora_entries.items()
        }
        strengths = {entry.name: entry.strength for entries in lora_entries.values() for entry in entries}
        plan = MergePlan(
            method=merge_method,
            arch=arch,
            sources=opened,
            model_names=model_names,
            base_name=base_name,
            params=resolve_params(
                merge_method,
                params,
                blocks=arch.blocks,
                source=source,
                model_names=model_names,
                base_name=base_name,
            ).with_loras(strengths),
            seed=seed,
            dtype=TORCH_DTYPES[dtype],
            compute_dtype=TORCH_DTYPES[compute_dtype],
            source=source,
            loras=read,
        )
        check_shapes(plan)
        plan.primary.check_complete("a")
    except BaseException:
        for model in opened.values():
            model.close()
        raise
    return plan


def plan_merge(recipe: Recipe, *, source: str) -> MergePlan:
    """The plan of a recipe (``source``: the recipe's file, for messages)."""
    return open_plan(
        recipe.models,
        recipe.method,
        params=recipe.params,
        loras=recipe.loras,
        seed=recipe.seed,
        dtype=recipe.dtype,
        compute_dtype=recipe.compute_dtype,
        source=source,
    )


def plan_checkpoint(path: Path, *, source: str | None = None) -> MergePlan:
    """One checkpoint as itself: a weighted sum of A and A with α = 0 (the file is held once)."""
    return open_plan(
        {"a": path, "b": path}, "weighted_sum", params={"alpha": 0.0}, source=source or str(path)
    )


def _read_lora(entry: LoraEntry, arch: Architecture, model: SourceModel, *, source: str) -> Lora:
    """The LoRA of ``entry``, checked against its model's own tensors: every tensor it adapts exists
    there with the shape its factors make (a LoRA for another family or size fails here)."""
    checkpoint = model.checkpoint
    shapes = {key: checkpoint.info(key).shape for key in checkpoint.keys()}
    try:
        return read_lora(entry.path, arch, shapes=shapes)
    except (ConfigError, CheckpointError) as error:
        raise ConfigError(f"{source}: LoRA '{entry.name}' on {model.path.name}: {error}") from None


_SHOWN_PER_FAMILY = 4  # models named per family in the error; the rest are counted


def _common_arch(sources: Mapping[str, SourceModel], *, source: str) -> Architecture:
    """The one family of every source (headers only); else ``MergeError`` listing the models of each
    family: ``sd1: a (anime.safetensors), b (photo.safetensors); sdxl: d (xl.safetensors)``."""
    by_family: dict[str, list[str]] = {}
    for name, model in sources.items():
        by_family.setdefault(model.arch.name, []).append(f"{name} ({model.path.name})")
    if len(by_family) > 1:
        shown = "; ".join(
            f"{family}: {', '.join(names[:_SHOWN_PER_FAMILY])}"
            + (f" and {len(names) - _SHOWN_PER_FAMILY} more" if len(names) > _SHOWN_PER_FAMILY else "")
            for family, names in by_family.items()
        )
        raise MergeError(f"{source}: models of different families cannot be merged: {shown}")
    return sources["a"].arch


def _drop_duplicates(
    opened: Mapping[str, SourceModel],
    method: MergeMethod,
    model_names: Sequence[str],
    loras: Mapping[str, Sequence[LoraEntry]],
    params: Mapping[str, BlockValue],
    *,
    source: str,
) -> list[str]:
    """The non-base models to drop because an earlier one is the same file (same bytes, without
    LoRAs), each with a one-line notice: a method over any number of models would count it twice.
    Only for such methods, never model a, and only while the method keeps enough models."""
    if method.max_models is not None:
        return []
    candidates = {
        name: opened[name].path for name in model_names if not loras.get(name) and opened[name].path.is_file()
    }
    dropped = []
    for name, earlier in duplicate_files(candidates).items():
        if name == "a" or len(model_names) - len(dropped) <= method.min_models:
            continue
        if f"{WEIGHT_PREFIX}{name}" in params:
            raise ConfigError(
                f"{source}: models.{name} ({opened[name].path}) is the same file as models.{earlier} "
                f"({opened[earlier].path}) and is merged once; remove {WEIGHT_PREFIX}{name}, or the duplicate"
            )
        log.warning(
            "%s: models.%s (%s) is the same file as models.%s (%s): merged once, %s dropped",
            source,
            name,
            opened[name].path,
            earlier,
            opened[earlier].path,
            name,
        )
        dropped.append(name)
    return dropped


def check_shapes(plan: MergePlan) -> None:
    """Every merged key of A must exist with the same shape in every other source, and A must have
    every merged key of the others (A's keys are the output's)."""
    primary = plan.primary.checkpoint
    others = {name: set(model.checkpoint.keys()) for name, model in plan.sources.items() if name != "a"}
    ours = set(primary.keys())
    for name, keys in others.items():
        checkpoint = plan.sources[name].checkpoint
        lacking = sorted(
            key
            for key in keys - ours
            if not key.startswith(EMA_PREFIX)
            and plan.merged_block(key, checkpoint.info(key).dtype) is not None
        )
        if lacking:
            shown = ", ".join(f"'{key}'" for key in lacking[:3]) + (" …" if len(lacking) > 3 else "")
            raise MergeError(
                f"model a ({plan.primary.path.name}) lacks {len(lacking)} tensor(s) that model {name} has: "
                f"{shown}; model a is incomplete or of another variant"
            )
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
