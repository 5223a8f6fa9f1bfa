"""The search space: which method parameters Optuna proposes, per block or per group of blocks, and
how a proposal becomes the ``BlockParams`` the engine merges.

A dimension is named ``param.BLOCK`` (e.g. ``alpha.IN04``) or ``param.GROUP`` (``alpha.IN_deep``); its
value applies to every block of the group. Blocks outside the search keep the study's fixed ``params``
(or the method's default). Everything is checked once, when the space is built: parameter names,
block names, ranges against the method's spec, and the fixed parameters (resolved into ``template``);
a proposal then only overwrites the searched values of that template.

A LoRA's strength is searched as ``lora.NAME`` (one number, not per block; ``NAME`` as the study's
``models`` name the LoRA). A weighted method's model weights are parameters ``weight.NAME`` like any
other (per block, or per group); ``search.weights`` is the shorthand for all of them: for every
non-base model one dimension ``weight.NAME`` over every block, or ``weight.NAME.GROUP`` per group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import optuna

from automerge.arch import VAE_BLOCK, Architecture
from automerge.errors import ConfigError
from automerge.merge import BlockParams, MergeMethod, MergePlan, resolve_params
from automerge.merge.params import weight_spec
from automerge.merge.plan import method_roles
from automerge.merge.recipe import LORA_STRENGTH_LIMIT, WEIGHT_PREFIX
from automerge.registry import did_you_mean
from automerge.study.config import InlineReward, SearchParam, StudyFile

LORA_PREFIX = "lora."
WEIGHTS = "weights"  # search.weights: every non-base model's weight.NAME


@dataclass(frozen=True)
class Dimension:
    """One value Optuna proposes: method parameter ``param`` for every block of ``blocks``, or the
    strength of a LoRA (``param`` "lora.NAME", no blocks)."""

    name: str  # "alpha.IN04", "lora.style"
    param: str
    blocks: tuple[str, ...]
    low: float
    high: float
    step: float | None
    log: bool

    def snap(self, value: float) -> float:
        """``value`` on the dimension's grid (baselines at the midpoint of a stepped range)."""
        if self.step is None:
            return value
        steps = round((value - self.low) / self.step)
        return min(self.high, self.low + steps * self.step)

    @property
    def lora(self) -> str | None:
        """The LoRA whose strength this is, None for a method parameter."""
        return self.param.removeprefix(LORA_PREFIX) if self.param.startswith(LORA_PREFIX) else None


@dataclass(frozen=True)
class Baseline:
    label: str
    values: dict[str, float]


@dataclass(frozen=True)
class SearchSpace:
    dimensions: tuple[Dimension, ...]
    template: BlockParams  # the fixed parameters; searched values are overwritten per proposal
    method: MergeMethod

    def suggest(self, trial: optuna.Trial) -> dict[str, float]:
        return {
            d.name: trial.suggest_float(d.name, d.low, d.high, step=d.step, log=d.log)
            for d in self.dimensions
        }

    def block_params(self, values: Mapping[str, float]) -> BlockParams:
        """The parameters of a proposal (Optuna's values by dimension name, e.g. a trial's ``params``)."""
        updates: dict[str, dict[str, float]] = {}
        strengths: dict[str, float] = {}
        for dimension in self.dimensions:
            value = float(values[dimension.name])
            if dimension.lora is not None:
                strengths[dimension.lora] = value
            else:
                updates.setdefault(dimension.param, {}).update(dict.fromkeys(dimension.blocks, value))
        return self.template.with_values(updates, lora_strengths=strengths)

    @property
    def live_loras(self) -> frozenset[str]:
        """The LoRAs whose strength is searched (the engine keeps what it needs to change them)."""
        return frozenset(d.lora for d in self.dimensions if d.lora is not None)

    def baselines(self) -> list[Baseline]:
        """Every dimension at its low end, high end and midpoint (pure A, pure B, uniform 0.5 for
        weighted_sum's alpha)."""
        points = (
            ("low", lambda d: d.low),
            ("high", lambda d: d.high),
            ("mid", lambda d: d.snap((d.low + d.high) / 2)),
        )
        return [
            Baseline(self._label(where), {d.name: pick(d) for d in self.dimensions}) for where, pick in points
        ]

    def _label(self, where: str) -> str:
        params = {d.param for d in self.dimensions}
        if self.method.name == "weighted_sum" and params == {"alpha"}:
            ends = {d.low for d in self.dimensions} | {d.high for d in self.dimensions}
            if ends == {0.0, 1.0}:
                return {"low": "A", "high": "B", "mid": "uniform 0.5"}[where]
        value = {"low": self.dimensions[0].low, "high": self.dimensions[0].high}.get(where)
        return f"all {where}" if value is None else f"all {value:g}"


def build_space(
    study: StudyFile, arch: Architecture, method: MergeMethod, *, model_names: Sequence[str] | None = None
) -> SearchSpace:
    """Dimensions for ``study.search`` on family ``arch`` and ``method``, every check done here.
    ``model_names``: the non-base models the plan merges (default: the study's, by the method's roles;
    a plan may have dropped a duplicate file)."""
    source = str(study.path)
    roles = method_roles(method, list(study.models), source=source)
    models = tuple(roles[0] if model_names is None else model_names)
    taken = set(method.param_names())
    dimensions: list[Dimension] = []
    for param, search in study.search.items():
        if param.startswith(LORA_PREFIX):
            dimensions.append(_lora_dimension(param, search, study, source=source))
            continue
        if param == WEIGHTS or param.startswith(WEIGHT_PREFIX):
            dimensions.extend(
                _weight_dimensions(
                    param, search, study=study, arch=arch, method=method, models=models, base_name=roles[1]
                )
            )
            continue
        if param not in taken:
            raise ConfigError(
                f"{source}: search.{param}: method '{method.name}' takes no parameter '{param}'"
                f"{did_you_mean(param, taken)}; it takes: {', '.join(sorted(taken)) or 'none'}"
            )
        dimensions.extend(_dimensions(param, search, arch, source=source))
    _check_ranges(dimensions, method, source=source)
    template = _template(study, arch, method, dimensions, model_names=models, base_name=roles[1])
    return SearchSpace(tuple(dimensions), template, method)


def _weight_dimensions(
    param: str,
    search: SearchParam,
    *,
    study: StudyFile,
    arch: Architecture,
    method: MergeMethod,
    models: Sequence[str],
    base_name: str | None,
) -> list[Dimension]:
    """``search.weight.NAME`` (like any parameter), or ``search.weights``: one ``weight.NAME`` over
    every block (or ``weight.NAME.GROUP`` per group) for each non-base model."""
    source = str(study.path)
    if not method.weighted:
        raise ConfigError(
            f"{source}: search.{param}: method '{method.name}' takes no per-model weights; use a method "
            "that does (see `automerge methods`) or remove it"
        )
    if param != WEIGHTS:
        model = param.removeprefix(WEIGHT_PREFIX)
        if model not in models:
            why = "is the base, which weighs nothing" if model == base_name else "is not a weighted model"
            raise ConfigError(
                f"{source}: search.{param}: model '{model}' {why}{did_you_mean(model, models)}; "
                f"the weighted models are {', '.join(models)}"
            )
        if WEIGHTS in study.search:
            raise ConfigError(f"{source}: search.{param}: search.{WEIGHTS} searches it already; remove one")
        return _dimensions(param, search, arch, source=source)
    if search.blocks != "all":
        raise ConfigError(
            f"{source}: search.{WEIGHTS}: gives one weight per model (over every block) or per group; "
            "use groups: {NAME: [BLOCK, ...]} instead of blocks"
        )
    if search.groups is not None:
        return [
            d for model in models for d in _dimensions(f"{WEIGHT_PREFIX}{model}", search, arch, source=source)
        ]
    return [
        Dimension(
            f"{WEIGHT_PREFIX}{model}",
            f"{WEIGHT_PREFIX}{model}",
            arch.merge_blocks,
            search.low,
            search.high,
            search.step,
            search.log,
        )
        for model in models
    ]


def _template(
    study: StudyFile,
    arch: Architecture,
    method: MergeMethod,
    dimensions: Sequence[Dimension],
    *,
    model_names: Sequence[str],
    base_name: str | None,
) -> BlockParams:
    """The study's fixed ``params`` with every searched block named (at its low end, a valid value), so
    the merged blocks — the VAE only when a map names it — are those of every proposal; the LoRAs at
    the strengths the study file gives them."""
    raw = {
        name: dict(value) if isinstance(value, dict) else {"default": value}
        for name, value in study.params.items()
    }
    for dimension in dimensions:
        if dimension.lora is None:
            raw.setdefault(dimension.param, {}).update(dict.fromkeys(dimension.blocks, dimension.low))
    strengths = {entry.name: entry.strength for entries in study.loras.values() for entry in entries}
    resolved = resolve_params(
        method, raw, blocks=arch.blocks, source=str(study.path), model_names=model_names, base_name=base_name
    )
    return resolved.with_loras(strengths)


def target_params(
    study: StudyFile, plan: MergePlan, *, reward: InlineReward | None = None, field: str = "reward"
) -> BlockParams:
    """A hidden target's parameters (``reward.reference.target.params``, or those of ``reward`` given
    at ``field``, an objective's): method parameters and model weights (``weight.NAME``) as a recipe
    gives them, ``lora.NAME`` a LoRA's strength (others at the study file's strengths)."""
    inline = reward if reward is not None else study.reward
    assert (
        isinstance(inline, InlineReward)
        and inline.reference is not None
        and inline.reference.target is not None
    )
    source = f"{study.path}: {field}.reference.target.params"
    raw = inline.reference.target.params
    strengths = dict(plan.params.lora_strengths)
    for param, value in raw.items():
        if not param.startswith(LORA_PREFIX):
            continue
        name = param.removeprefix(LORA_PREFIX)
        if name not in strengths or not isinstance(value, float | int):
            raise ConfigError(
                f"{source}: {param} must be one number, the strength of one of the study's LoRAs "
                f"({', '.join(sorted(strengths)) or 'none'})"
            )
        strengths[name] = float(value)
    params = {param: value for param, value in raw.items() if not param.startswith(LORA_PREFIX)}
    resolved = resolve_params(
        plan.method,
        params,
        blocks=plan.arch.blocks,
        source=source,
        model_names=plan.model_names,
        base_name=plan.base_name,
    )
    return resolved.with_loras(strengths)


def _lora_dimension(param: str, search: SearchParam, study: StudyFile, *, source: str) -> Dimension:
    """``search.lora.NAME``: the strength of the study's LoRA NAME, one number for its whole model."""
    name = param.removeprefix(LORA_PREFIX)
    names = sorted(study.lora_names)
    if name not in names:
        given = f"the study's LoRAs are {', '.join(names)}" if names else "the study applies no LoRA"
        raise ConfigError(
            f"{source}: search.{param}: no LoRA named '{name}'{did_you_mean(name, names)}; {given} "
            "(models: {a: {checkpoint: ..., loras: [{path: ..., name: NAME}]}})"
        )
    if search.groups is not None or search.blocks != "all":
        raise ConfigError(f"{source}: search.{param}: a LoRA strength is one number; remove blocks/groups")
    for end in (search.low, search.high):
        if not -LORA_STRENGTH_LIMIT <= end <= LORA_STRENGTH_LIMIT:
            raise ConfigError(
                f"{source}: search.{param}: strengths lie in [-{LORA_STRENGTH_LIMIT:g}, {LORA_STRENGTH_LIMIT:g}], "
                f"got {end:g}"
            )
    return Dimension(param, param, (), search.low, search.high, search.step, search.log)


def _dimensions(param: str, search: SearchParam, arch: Architecture, *, source: str) -> list[Dimension]:
    def make(name: str, blocks: Sequence[str]) -> Dimension:
        for block in blocks:
            if block not in arch.blocks:
                raise ConfigError(
                    f"{source}: search.{param}: no block '{block}' in {arch.title}{did_you_mean(block, arch.blocks)}; "
                    f"blocks are {', '.join(arch.blocks)}"
                )
        return Dimension(
            f"{param}.{name}", param, tuple(blocks), search.low, search.high, search.step, search.log
        )

    if search.groups is not None:
        return [make(group, blocks) for group, blocks in search.groups.items()]
    blocks = arch.merge_blocks if search.blocks == "all" else search.blocks
    return [make(block, (block,)) for block in blocks if block != VAE_BLOCK or search.blocks != "all"]


def _check_ranges(dimensions: Sequence[Dimension], method: MergeMethod, *, source: str) -> None:
    specs = {spec.name: spec for spec in method.params}
    for dimension in dimensions:
        if dimension.lora is not None:
            continue
        spec = specs.get(dimension.param) or weight_spec(dimension.param.removeprefix(WEIGHT_PREFIX))
        for end in (dimension.low, dimension.high):
            problem = spec.check(end)
            if problem is not None:
                raise ConfigError(f"{source}: search.{dimension.param}: {problem}")
