"""Per-block merge parameters: parse, validate and look up ``{param: number | {default, BLOCK: number}}``.

Every parameter of a merge method may be one number (all blocks) or a per-block map such as
``{default: 0.5, IN04: 0.8}``; a map without ``default`` falls back to the method's default.
Product rule: the ``VAE`` block is merged only when some parameter's map names it explicitly;
otherwise it gets no entry and ``BlockParams.merges("VAE")`` is False.

A method that takes per-model weights (``MergeMethod.weighted``) also takes ``weight.NAME`` for each
non-base model NAME (default 1, range [0, inf), 0 drops the model's contribution), a number or a
per-block map like any parameter. They live beside the method's parameters in ``values`` — none when
no weight is given (every model weighs 1), else one entry per non-base model — but ``for_block``
gives the method's own only, and ``model_weights`` the block's weights in model order.

``BlockParams`` also carries the strength of each LoRA applied to a source (by the LoRA's name), since
a study may search those too; they are not per block.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from automerge.arch import VAE_BLOCK
from automerge.errors import ConfigError
from automerge.merge.methods import MergeMethod, ParamSpec
from automerge.merge.recipe import WEIGHT_PREFIX
from automerge.registry import did_you_mean

BlockValue = float | Mapping[str, float]  # as written in YAML: one number, or {default, BLOCK: number}
DEFAULT_KEY = "default"


def weight_spec(model: str) -> ParamSpec:
    """The parameter ``weight.MODEL``: model MODEL's weight in a weighted method, default 1, [0, inf)."""
    return ParamSpec(
        name=f"{WEIGHT_PREFIX}{model}", default=1.0, low=0.0, high=None, doc=f"weight of model {model}"
    )


@dataclass(frozen=True)
class BlockParams:
    """Resolved, validated parameters: ``values[param][block]`` for every merged block."""

    values: Mapping[str, Mapping[str, float]]
    blocks: tuple[str, ...]  # the merged blocks, in the family's order
    lora_strengths: Mapping[str, float] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    # LoRA name → strength (not per block)

    def merges(self, block: str) -> bool:
        """Whether ``block`` is merged (False for VAE unless a map named it)."""
        return block in self.blocks

    def for_block(self, block: str) -> dict[str, float]:
        """The method's parameters for one merged block, ready for ``merge_tensor(params=...)``."""
        return {name: value for name, value in self._all_for_block(block).items() if not _is_weight(name)}

    def model_weights(self, block: str, model_names: Sequence[str]) -> list[float] | None:
        """The block's weight of each of ``model_names`` (``merge_tensor(weights=...)``); None when
        no weight is given (every model weighs 1, or the method takes no weights)."""
        values = self._all_for_block(block)
        if not any(_is_weight(name) for name in values):
            return None
        return [values[f"{WEIGHT_PREFIX}{name}"] for name in model_names]

    def value(self, param: str, block: str) -> float:
        """Parameter ``param`` (a method parameter or ``weight.NAME``) in merged ``block``; a model
        weight that no value was given for is 1."""
        values = self._all_for_block(block)
        return values.get(param, 1.0) if _is_weight(param) else values[param]

    def _all_for_block(self, block: str) -> dict[str, float]:
        if not self.merges(block):
            raise KeyError(f"block '{block}' is not merged (merged: {', '.join(self.blocks)})")
        return {name: per_block[block] for name, per_block in self.values.items()}

    def with_values(
        self, updates: Mapping[str, Mapping[str, float]], *, lora_strengths: Mapping[str, float] | None = None
    ) -> BlockParams:
        """These parameters with ``updates[param][block]`` replaced (merged blocks of known
        parameters only: the caller checked the values, e.g. a search space against its spec), and
        the LoRA strengths of ``lora_strengths`` (known LoRAs only)."""
        strengths = dict(self.lora_strengths)
        for name, strength in (lora_strengths or {}).items():
            if name not in strengths:
                raise KeyError(f"no LoRA named '{name}' (LoRAs: {', '.join(strengths) or 'none'})")
            strengths[name] = float(strength)
        values = {name: dict(per_block) for name, per_block in self.values.items()}
        for name, per_block in updates.items():
            for block, value in per_block.items():
                if block not in values[name]:
                    raise KeyError(f"block '{block}' is not merged (merged: {', '.join(self.blocks)})")
                values[name][block] = value
        return BlockParams(
            values=MappingProxyType({name: MappingProxyType(v) for name, v in values.items()}),
            blocks=self.blocks,
            lora_strengths=MappingProxyType(strengths),
        )

    def with_loras(self, strengths: Mapping[str, float]) -> BlockParams:
        """These parameters with exactly the LoRAs of ``strengths`` (a plan sets them once)."""
        return dataclasses.replace(self, lora_strengths=MappingProxyType(dict(strengths)))

    def as_recipe(self) -> dict[str, float | dict[str, float]]:
        """The parameters as a recipe writes them, reading back to equal ``BlockParams``: one number
        where every merged block has the same value and the VAE is not merged, else every merged
        block by name."""
        recipe: dict[str, float | dict[str, float]] = {}
        for name, per_block in self.values.items():
            distinct = set(per_block.values())
            if len(distinct) == 1 and not self.merges(VAE_BLOCK):
                recipe[name] = distinct.pop()
            else:
                recipe[name] = {block: per_block[block] for block in self.blocks}
        return recipe


def resolve_params(
    method: MergeMethod,
    raw: Mapping[str, BlockValue],
    *,
    blocks: Sequence[str],
    source: str,
    model_names: Sequence[str] = (),
    base_name: str | None = None,
) -> BlockParams:
    """Validate ``raw`` against ``method``'s ParamSpecs, the family's ``blocks`` and, for a weighted
    method, ``weight.NAME`` against the non-base ``model_names``; ``ConfigError``s name ``source``."""
    specs = {spec.name: spec for spec in method.params}
    weights = {spec.name: spec for spec in map(weight_spec, model_names if method.weighted else ())}
    for name in raw:
        if _is_weight(name) and name not in weights:
            _check_weight_name(str(name), method, weights, base_name=base_name, source=source)
        elif name not in specs and name not in weights:
            takes = f"it takes: {', '.join(specs)}" if specs else "it takes no parameters"
            raise ConfigError(
                f"{source}: method '{method.name}' takes no parameter '{name}'{did_you_mean(str(name), list(specs))}; {takes}"
            )
    if any(_is_weight(name) for name in raw):  # one weight given: every model's weight is in values
        specs.update(weights)
    parsed = {name: _parse(spec, raw.get(name), blocks=blocks, source=source) for name, spec in specs.items()}
    named_vae = any(VAE_BLOCK in explicit for _, explicit in parsed.values())
    merged = tuple(block for block in blocks if block != VAE_BLOCK or named_vae)
    values = {
        name: MappingProxyType(_fill(specs[name], *parsed[name], merged=merged, method=method, source=source))
        for name in specs
    }
    return BlockParams(values=MappingProxyType(values), blocks=merged)


def changed_blocks(old: BlockParams | None, new: BlockParams) -> set[str]:
    """Blocks whose parameters (model weights included) differ, or that are merged in only one of
    the two (all when ``old`` is None).

    Compares values only: the caller re-merges everything when the method itself changed.
    """
    if old is None:
        return set(new.blocks)
    return {
        block
        for block in set(old.blocks) | set(new.blocks)
        if not (
            old.merges(block) and new.merges(block) and old._all_for_block(block) == new._all_for_block(block)
        )
    }


def _is_weight(name: str) -> bool:
    return name.startswith(WEIGHT_PREFIX)


def _check_weight_name(
    name: str, method: MergeMethod, weights: Mapping[str, ParamSpec], *, base_name: str | None, source: str
) -> None:
    """``ConfigError`` for ``weight.X`` that no model of this merge takes (the caller found no spec)."""
    if not method.weighted:
        raise ConfigError(
            f"{source}: method '{method.name}' takes no per-model weights ('{name}'); remove it, or use a "
            "method that takes weights (see `automerge methods`)"
        )
    model = name.removeprefix(WEIGHT_PREFIX)
    if model == base_name:
        raise ConfigError(
            f"{source}: '{name}': model {model} is the base, which weighs nothing (the other models' "
            f"differences from it are weighted); remove it"
        )
    names = [key.removeprefix(WEIGHT_PREFIX) for key in weights]
    raise ConfigError(
        f"{source}: '{name}': there is no model '{model}' to weigh{did_you_mean(model, names)}; "
        f"the weighted models are {', '.join(names) or 'none'}"
    )


def _parse(
    spec: ParamSpec, value: Any, *, blocks: Sequence[str], source: str
) -> tuple[float | None, dict[str, float]]:
    """(the value for unnamed blocks or None, the explicitly named blocks), each value checked."""
    if value is None:
        return None, {}
    if not isinstance(value, Mapping):
        return _number(spec, value, where="", source=source), {}
    default: float | None = None
    explicit: dict[str, float] = {}
    for block, entry in value.items():
        if block == DEFAULT_KEY:
            default = _number(spec, entry, where=" default", source=source)
        elif block in blocks:
            explicit[block] = _number(spec, entry, where=f" for block {block}", source=source)
        else:
            hint = did_you_mean(str(block).upper(), list(blocks)) or did_you_mean(str(block), [DEFAULT_KEY])
            raise ConfigError(
                f"{source}: `{spec.name}` names block '{block}'{hint}, which this model family does not have; "
                f"valid: {DEFAULT_KEY}, {', '.join(blocks)}"
            )
    return default, explicit


def _number(spec: ParamSpec, value: Any, *, where: str, source: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ConfigError(
            f"{source}: `{spec.name}`{where} must be a number (or a map of block → number), got {value!r}"
        )
    problem = spec.check(float(value))
    if problem is not None:
        raise ConfigError(f"{source}: `{spec.name}`{where} {problem}")
    return float(value)


def _fill(
    spec: ParamSpec,
    default: float | None,
    explicit: dict[str, float],
    *,
    merged: tuple[str, ...],
    method: MergeMethod,
    source: str,
) -> dict[str, float]:
    """One value per merged block: named, else the map's/scalar default, else the method's default."""
    fallback = default if default is not None else spec.default
    values: dict[str, float] = {}
    missing: list[str] = []
    for block in merged:
        value = explicit.get(block, fallback)
        if value is None:
            missing.append(block)
        else:
            values[block] = value
    if missing:
        raise ConfigError(
            f"{source}: method '{method.name}' needs `{spec.name}` (it has no default) for blocks "
            f"{', '.join(missing)}; give one number or a map with `{DEFAULT_KEY}`"
        )
    return values
