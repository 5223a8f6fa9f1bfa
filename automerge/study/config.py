"""Study files (``studies/*.yaml``): what to merge, what to search, how to score, when to stop.

Paths are relative to the study file. Everything that can be checked without loading a model is
checked here (keys, ranges, files that must exist); block names are checked against the family as
soon as the sources' headers are read, still before any tensor is loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from automerge.arch import ARCHITECTURES
from automerge.config import FileRef, Schema, parse_file
from automerge.dtypes import DtypeName
from automerge.errors import ConfigError, StudyError
from automerge.files import relative_path
from automerge.merge.recipe import (
    LoraEntry,
    check_lora_names,
    check_model_names,
    context_dir,
    lift_model_entries,
)
from automerge.render.config import RenderConfig
from automerge.rewards.manifest import MANIFEST_SUFFIXES, find_manifest

_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(text: str | float | int | None) -> float | None:
    """Seconds from ``8h``, ``90m``, ``1h30m``, ``45s`` or a number of seconds; None stays None."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    match = _DURATION.fullmatch(text.strip())
    if not text.strip() or match is None or not any(match.groups()):
        raise ValueError("durations look like 8h, 90m, 1h30m or 45s")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


class SearchParam(Schema):
    """One method parameter to optimize: per block (``blocks``) or per group of blocks (``groups``)."""

    blocks: Literal["all"] | list[str] = "all"
    groups: dict[str, list[str]] | None = None
    low: float = 0.0
    high: float = 1.0
    step: float | None = Field(None, ge=1e-6, description="a grid step, at least 1e-6")
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> SearchParam:
        if self.low > self.high:
            raise ValueError(f"low ({self.low:g}) must not be greater than high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError("log scale needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined (Optuna's rule)")
        if self.groups is not None and self.blocks != "all":
            raise ValueError("give either blocks or groups, not both")
        if self.groups is not None and not self.groups:
            raise ValueError("groups must name at least one group")
        if self.groups is not None:
            seen: dict[str, str] = {}
            for group, blocks in self.groups.items():
                for block in blocks:
                    if block in seen:
                        raise ValueError(
                            f"block {block} is in two groups, {seen[block]} and {group}; keep it in one"
                        )
                    seen[block] = group
        return self


class SamplerConfig(Schema):
    name: str = Field(
        "auto",
        description="a registered sampler: auto, gp, tpe, cmaes, random, qmc; nsga2, nsga3 with several objectives",
    )
    seed: int = Field(0, ge=0, le=2**32 - 1)
    startup_trials: int = Field(10, ge=0)
    warp_margin: float = Field(
        0.01, gt=0, le=1, description="auto: δ of its log-gap warp, as a fraction of the value range"
    )
    local_every: int = Field(
        3, ge=0, description="auto: every n-th trial is a one-coordinate step from the best (0: never)"
    )
    local_after: int = Field(20, ge=0, description="auto: complete trials before the first local step")
    local_steps: Literal["gaussian", "compass"] = Field(
        "compass",
        description="auto: the coordinates in turn, each step doubled after a win and halved and "
        "reversed after a loss (compass), or a random coordinate moved by a Gaussian step (gaussian)",
    )

    @field_validator("name")
    @classmethod
    def _known_sampler(cls, name: str) -> str:
        from automerge.registry import did_you_mean
        from automerge.study.samplers import MULTI_OBJECTIVE_SAMPLERS, SAMPLERS  # they import this module

        if name in SAMPLERS or name in MULTI_OBJECTIVE_SAMPLERS:
            return name
        known = sorted({*SAMPLERS.names(), *MULTI_OBJECTIVE_SAMPLERS.names()})
        raise ValueError(f"unknown sampler '{name}'{did_you_mean(name, known)}; known: {', '.join(known)}")


class EarlyStoppingConfig(Schema):
    patience: int = Field(40, ge=1, description="stop after this many completed trials without improvement")
    min_delta: float = Field(0.002, ge=0, description="an improvement must exceed this")


class MultiFidelityConfig(Schema):
    """Render the payloads' ``fidelities`` (cheaper previews) first; only the best ``promote`` fraction
    of the trials at each preview goes on to the full payload."""

    promote: float = Field(0.34, gt=0, le=1, description="fraction of the trials promoted at each preview")
    startup_trials: int = Field(
        10, ge=1, description="trials that reach a preview before any is stopped there"
    )


class HeartbeatConfig(Schema):
    """A running trial's heartbeat in an SQLite or PostgreSQL storage: a worker that stops beating for
    ``grace`` seconds (killed, frozen, powered off) has its trial failed and re-run once."""

    interval: int = Field(30, ge=1, description="seconds between heartbeats")
    grace: int = Field(120, ge=2, description="seconds of silence before a trial counts as dead")

    @model_validator(mode="after")
    def _grace_after_interval(self) -> HeartbeatConfig:
        if self.grace <= self.interval:
            raise ValueError(f"grace ({self.grace} s) must be longer than interval ({self.interval} s)")
        return self


class ExportConfig(Schema):
    dir: FileRef | None = None
    dtype: DtypeName = "fp16"


class TinyModelSpec(Schema):
    """A tiny model made on first use (demo, tests, benchmarks): ``automerge tiny`` in a field."""

    tiny: str = Field(description="the family: sd1, sd2, sdxl, ... (any registered architecture)")
    seed: int = 0
    like: str | None = Field(None, description="name of another generated model to fine-tune from")
    delta: float = Field(0.05, gt=0)

    @field_validator("tiny")
    @classmethod
    def _known_family(cls, family: str) -> str:
        return ARCHITECTURES.require(family)


class ReferenceTarget(Schema):
    """A reference rendered once from a hidden merge of the study's own models (hidden-target problems)."""

    params: dict[str, float | dict[str, float]]


class InlineReference(Schema):
    """``reward: {reference: ...}``: similarity to reference images, no weights needed."""

    metric: Literal["ssim", "mse"] = "ssim"
    folder: FileRef | None = None
    checkpoint: FileRef | None = None
    target: ReferenceTarget | None = None

    @model_validator(mode="after")
    def _one_source(self) -> InlineReference:
        given = [name for name in ("folder", "checkpoint", "target") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of folder, checkpoint or target (got {', '.join(given) or 'none'})"
            )
        return self


class HumanReward(Schema):
    """``reward: {human: …}``: a person judges each candidate's image grid in optuna-dashboard
    (``automerge/study/human.py``). ``compare``: the person picks the worst of the grids shown and
    optuna-dashboard's ``PreferentialGPSampler`` proposes from those choices; ``rate``: the person
    scores each grid (a slider from ``low`` to ``high``, or the labelled buttons of ``choices``)."""

    mode: Literal["compare", "rate"] = Field(
        description="compare: pick the worst of the grids shown; rate: score each grid"
    )
    candidates: int = Field(
        3,
        ge=1,
        le=16,
        description="grids kept waiting for the person (compare: shown side by side, at least 2)",
    )
    low: float = Field(1.0, description="rate: the slider's lowest score")
    high: float = Field(10.0, description="rate: the slider's highest score")
    step: float | None = Field(1.0, gt=0, description="rate: the slider's step (null: continuous)")
    choices: dict[str, float] | None = Field(
        None,
        description="rate: labelled buttons instead of the slider, label → score, e.g. {bad: 0, good: 1}",
    )

    @model_validator(mode="after")
    def _fits_the_mode(self) -> HumanReward:
        rate_only = sorted({"low", "high", "step", "choices"} & self.model_fields_set)
        if self.mode == "compare" and rate_only:
            raise ValueError(f"{', '.join(rate_only)}: for mode: rate only; remove it for mode: compare")
        if self.mode == "compare" and self.candidates < 2:
            raise ValueError(
                f"candidates: compare shows at least 2 grids side by side, got {self.candidates}"
            )
        if self.low >= self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.choices is not None and len(self.choices) < 2:
            raise ValueError("choices: give at least two labelled scores, e.g. {bad: 0, good: 1}")
        return self


class InlineReward(Schema):
    """``reward: {reference: …}`` (similarity to reference images) or ``reward: {human: …}`` (a
    person's judgement): exactly one of them."""

    reference: InlineReference | None = None
    human: HumanReward | None = Field(None, validate_default=True)

    @model_serializer(mode="wrap")
    def _the_given_kind(self, handler: SerializerFunctionWrapHandler) -> Any:
        """Only the kind given: a reference reward dumps as it did before ``human`` existed, so the
        fingerprints of stored studies stay the same (and they resume)."""
        data = handler(self)
        return (
            {key: value for key, value in data.items() if value is not None}
            if isinstance(data, dict)
            else data
        )

    @field_validator("human")
    @classmethod
    def _one_kind(cls, human: HumanReward | None, info: ValidationInfo) -> HumanReward | None:
        if "reference" not in info.data:  # reference itself failed: its own error says why
            return human
        if (info.data["reference"] is None) == (human is None):
            raise ValueError(
                "give exactly one of reference (similarity to reference images) or human (a person judges)"
            )
        return human


_OBJECTIVE_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"


class ObjectiveConfig(Schema):
    """One score of a study with several objectives: a reward (what ``reward:`` takes: a manifest, a
    composite or ``{reference: …}``), whether it is maximized or minimized, and its name in the
    report, the dashboard and the terminal (default: the manifest's name, or ``METRIC-SOURCE`` for an
    inline reference, e.g. ``mse-target``). A bare manifest or ``{reference: …}`` is the reward
    itself, maximized."""

    reward: FileRef | InlineReward
    direction: Literal["maximize", "minimize"] = "maximize"
    name: str | None = Field(
        None, max_length=60, description="letters, digits, '.', '_' and '-', starting with a letter or digit"
    )

    @model_validator(mode="before")
    @classmethod
    def _bare_reward(cls, data: Any) -> Any:
        if isinstance(data, str | Path):
            return {"reward": data}
        if isinstance(data, dict) and "reference" in data and "reward" not in data:
            rest = {key: value for key, value in data.items() if key != "reference"}
            return {"reward": {"reference": data["reference"]}, **rest}
        return data

    @field_validator("reward")
    @classmethod
    def _not_human(cls, reward: Path | InlineReward) -> Path | InlineReward:
        if isinstance(reward, InlineReward) and reward.human is not None:
            raise ValueError(
                "a human reward is a study's only score; give it as reward: {human: …}, not in a list"
            )
        return reward

    @field_validator("name")
    @classmethod
    def _a_plain_name(cls, name: str | None) -> str | None:
        if name is not None and not re.fullmatch(_OBJECTIVE_NAME, name):
            raise ValueError(
                "an objective's name is letters, digits, '.', '_' and '-', starting with a letter or digit"
            )
        return name

    @property
    def label(self) -> str:
        """``name``, else the manifest's stem or ``METRIC-SOURCE`` (``mse-target``, ``ssim-anime``)."""
        if self.name is not None:
            return self.name
        if isinstance(self.reward, Path):
            return self.reward.stem
        reference = self.reward.reference
        assert reference is not None  # a human reward is refused in lists (_not_human)
        source = (
            "target"
            if reference.target is not None
            else (reference.checkpoint or reference.folder or Path("reference")).stem
        )
        return f"{reference.metric}-{source}"


class GuardConfig(Schema):
    """A held-out panel that scores the best trial as it changes (``automerge/study/guard.py``): other
    reward models (``rewards``; default: the study's own reward) on the validation payloads (default
    when the study has them) or on the study's payloads. When the proxy improves while a member gets
    worse by more than ``tolerance`` standard errors of its seed noise, the run warns; ``stop: true``
    ends the study there and exports the last best the guard agreed with."""

    rewards: list[ObjectiveConfig] = Field(
        default_factory=list, description="guard rewards (manifests or {reference: …}); default: the study's"
    )
    payloads: Literal["validation", "study"] | None = Field(
        None, description="the panel's payloads: validation (the default when given) or study"
    )
    every: int = Field(1, ge=1, description="guard the best at most once every this many completed trials")
    tolerance: float = Field(2.0, gt=0, description="a drop counts above this many standard errors")
    stop: bool = Field(
        False, description="end the study at the first disagreement; export the last agreed best"
    )


@dataclass(frozen=True)
class Scoring:
    """One score of a study, as the runtime computes it: ``reward:`` (named ``score``, maximized) or
    one entry of ``objectives:``; ``field`` names it in error lines."""

    field: str
    name: str
    direction: Literal["maximize", "minimize"]
    reward: Path | InlineReward


SEARCH_FIELDS = {
    "models",
    "loras",
    "method",
    "search",
    "params",
    "seed",
    "payloads",
    "reward",
    "objectives",
    "generate",
}


def _sha256_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class StudyFile(Schema):
    """A study file, validated; paths resolved relative to it."""

    _path: Path | None = PrivateAttr(None)  # the file, set by load_study_file

    name: str = Field(
        min_length=1,
        max_length=200,
        description="the study's name in storage and its export folder: letters, digits, . _ - and spaces",
    )
    models: dict[str, FileRef]
    loras: dict[str, list[LoraEntry]] = Field(
        default_factory=dict, description="per model name, LoRAs applied to it (from models.X.loras)"
    )
    generate: dict[str, TinyModelSpec] = Field(default_factory=dict)
    method: str = "weighted_sum"
    search: dict[str, SearchParam]
    params: dict[str, float | dict[str, float]] = Field(default_factory=dict)
    seed: int = Field(0, ge=0, description="merge seed for random methods")
    payloads: list[FileRef] = Field(min_length=1)
    validation_payloads: list[FileRef] = Field(default_factory=list)
    reward: FileRef | InlineReward | None = None
    objectives: list[ObjectiveConfig] | None = Field(
        None, min_length=1, description="several scores, each maximized or minimized: the Pareto front"
    )
    guard: GuardConfig | None = None
    sampler: SamplerConfig = SamplerConfig()
    pruner: Literal["none", "median"] = "none"
    multi_fidelity: MultiFidelityConfig | None = None
    trials: int = Field(200, ge=1, le=10_000_000, strict=True)
    timeout: str | float | None = None
    early_stopping: EarlyStoppingConfig | None = EarlyStoppingConfig()
    baselines: bool = True
    storage: str | None = None
    artifacts: FileRef | None = Field(
        None,
        description="folder of the trials' images (default: <study>-artifacts beside the study file); "
        "workers on several machines need one they all mount",
    )
    heartbeat: HeartbeatConfig = HeartbeatConfig()
    export: ExportConfig = ExportConfig()
    render: RenderConfig = RenderConfig()

    @field_validator("name")
    @classmethod
    def _a_name_not_a_path(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._ -]*", name):
            raise ValueError(
                "a study name is letters, digits, '.', '_', '-' and spaces, starting with a letter or digit "
                "(it names the export folder, not a path)"
            )
        return name

    @model_validator(mode="before")
    @classmethod
    def _entries(cls, data: Any, info: ValidationInfo) -> Any:
        return lift_model_entries(data, base_dir=context_dir(info))

    @field_validator("models")
    @classmethod
    def _model_names(cls, models: dict[str, Path]) -> dict[str, Path]:
        return check_model_names(models)

    @model_validator(mode="after")
    def _lora_names(self) -> StudyFile:
        check_lora_names(self.loras, self.models)
        return self

    @model_validator(mode="after")
    def _one_way_to_score(self) -> StudyFile:
        if self.reward is not None and self.objectives is not None:
            raise ValueError(
                "reward and objectives: give one of them, not both (reward: one score; "
                "objectives: a list of scores, each with a direction)"
            )
        if self.reward is None and self.objectives is None:
            raise ValueError(
                "field 'reward' is required (or objectives: a list of scores, each with a direction)"
            )
        if self.objectives is not None:
            check_objectives(self)
        if self.human is not None:
            check_human(self)
        elif not self.multi_objective:
            check_single_objective_sampler(self.sampler.name)
        if self.guard is not None:
            check_guard(self)
        return self

    @property
    def lora_names(self) -> set[str]:
        return {entry.name for entries in self.loras.values() for entry in entries}

    @property
    def path(self) -> Path:
        """The study file (absolute), as ``load_study_file`` read it."""
        if self._path is None:
            raise StudyError("this StudyFile was not read from a file; load it with load_study_file(path)")
        return self._path

    @field_validator("search")
    @classmethod
    def _search_not_empty(cls, search: dict[str, SearchParam]) -> dict[str, SearchParam]:
        if not search:
            raise ValueError("name at least one method parameter to optimize, e.g. alpha: {blocks: all}")
        return search

    @field_validator("timeout")
    @classmethod
    def _duration(cls, value: str | float | None) -> str | float | None:
        seconds = parse_duration(value)
        if seconds is not None and seconds <= 0:
            raise ValueError("must be longer than 0 s; remove timeout for no limit")
        return value

    @property
    def guard_payloads(self) -> Literal["validation", "study"]:
        """The guard panel's payloads: ``guard.payloads``, else validation when the study has some."""
        chosen = self.guard.payloads if self.guard is not None else None
        return chosen or ("validation" if self.validation_payloads else "study")

    @property
    def guard_scorings(self) -> list[Scoring]:
        """The guard panel's members: ``guard.rewards``, else the study's reward (named ``score``)."""
        if self.guard is None:
            return []
        if not self.guard.rewards:
            return self.scorings
        return [
            Scoring(f"guard.rewards[{index}].reward", member.label, member.direction, member.reward)
            for index, member in enumerate(self.guard.rewards)
        ]

    @property
    def timeout_seconds(self) -> float | None:
        return parse_duration(self.timeout)

    @property
    def multi_objective(self) -> bool:
        """Two or more ``objectives``: a Pareto front instead of a best trial."""
        return self.objectives is not None and len(self.objectives) > 1

    @property
    def human(self) -> HumanReward | None:
        """``reward: {human: …}``: a person judges the candidates (``study/human.py``)."""
        reward = self.reward
        return reward.human if isinstance(reward, InlineReward) else None

    @property
    def scorings(self) -> list[Scoring]:
        """The study's scores in order: ``reward:`` as one maximized score, else each objective; none
        for a human reward (the person scores, no model)."""
        if self.human is not None:
            return []
        if self.reward is not None:
            return [Scoring("reward", "score", "maximize", self.reward)]
        return [
            Scoring(f"objectives[{index}].reward", objective.label, objective.direction, objective.reward)
            for index, objective in enumerate(self.objectives or ())
        ]

    def search_fingerprint(self) -> str:
        """sha256 of what defines the search problem; the trial budget, timeout, stopping, export and
        storage may change between runs, these may not. Paths count relative to the study file's
        folder, so a study resumes from any working directory and after its project folder moved."""
        return _sha256_json(self._search_problem())

    def _search_problem(self) -> dict[str, Any]:
        """The search fields as plain data; ``loras`` only when some model has LoRAs and ``reward`` or
        ``objectives`` only the one given, so that studies made before LoRAs and objectives existed
        keep their fingerprints (and resume)."""
        absent = {name for name in ("reward", "objectives") if getattr(self, name) is None}
        fields = SEARCH_FIELDS - absent - (set() if self.loras else {"loras"})
        return as_plain(self.model_dump(include=fields), relative_to=self.path.parent)

    def content_fingerprints(self) -> dict[str, str]:
        """sha256 of each part of the search problem with the contents of the files it names: each
        payload's resolved jobs (prompts, seeds, settings, previews) and the reward manifest(s) as
        parsed, so that an edited payload or manifest is a changed problem while a comment is not."""
        plain = self._search_problem()
        parts = {name: _sha256_json(plain.get(name)) for name in sorted(SEARCH_FIELDS) if name in plain}
        parts["payloads"] = _sha256_json([plain["payloads"], [_payload_content(p) for p in self.payloads]])
        if isinstance(self.reward, Path):
            parts["reward"] = _sha256_json([plain["reward"], _manifest_content(self.reward)])
        if self.objectives is not None:
            manifests = [
                _manifest_content(o.reward) if isinstance(o.reward, Path) else None for o in self.objectives
            ]
            parts["objectives"] = _sha256_json([plain["objectives"], manifests])
        return parts


def check_single_objective_sampler(name: str) -> None:
    """A sampler of several objectives only (NSGA-II/III) on a study with one score: a ``ValueError``."""
    from automerge.study.samplers import SAMPLERS

    if name not in SAMPLERS:
        raise ValueError(
            f"sampler.name: {name} is for several objectives; with one score use {', '.join(SAMPLERS.names())}"
        )


SINGLE_OBJECTIVE_KNOBS = ("warp_margin", "local_every", "local_after", "local_steps")
"""``auto``'s settings for one score (its warp and local steps), refused with several objectives."""


def check_objectives(study: StudyFile) -> None:
    """What several objectives rule out, each a ``ValueError`` naming the field and the fix: names
    used twice, a lone minimized objective, pruning and previews (Optuna prunes single-objective
    studies only), samplers for one score and ``auto``'s single-score settings."""
    from automerge.study.samplers import MULTI_OBJECTIVE_SAMPLERS

    objectives = study.objectives or []
    labels = [objective.label for objective in objectives]
    for index, label in enumerate(labels):
        if label in labels[:index]:
            raise ValueError(
                f"objectives[{index}]: the name '{label}' is taken by objectives[{labels.index(label)}]; "
                f"give each objective its own name, e.g. name: {label}-2"
            )
    if len(objectives) == 1 and objectives[0].direction == "minimize":
        raise ValueError(
            "objectives[0].direction: a single objective is maximized, as reward: is; minimize needs a "
            "second objective (or a reward whose higher score is better)"
        )
    if len(objectives) < 2:
        return
    if study.pruner != "none":
        raise ValueError(
            f"pruner: {study.pruner} needs one score (Optuna prunes single-objective studies only); "
            "remove pruner: for several objectives"
        )
    if study.multi_fidelity is not None:
        raise ValueError(
            "multi_fidelity: previews are promoted by one score; remove multi_fidelity: for several objectives"
        )
    name = study.sampler.name
    if name not in MULTI_OBJECTIVE_SAMPLERS:
        raise ValueError(
            f"sampler.name: {name} optimizes one score; with several objectives use "
            f"{', '.join(MULTI_OBJECTIVE_SAMPLERS.names())}"
        )
    for knob in SINGLE_OBJECTIVE_KNOBS:
        if knob in study.sampler.model_fields_set:
            raise ValueError(
                f"sampler.{knob}: auto's {knob} is for one score; remove it for several objectives"
            )


def check_guard(study: StudyFile) -> None:
    """What a guard needs, each a ``ValueError`` naming the field and the fix: one score to guard, a
    panel that holds something out (another reward or the validation payloads), names used once."""
    guard = study.guard
    assert guard is not None
    if study.multi_objective:
        raise ValueError(
            "guard: guards the best trial of a study with one score; with several objectives every "
            "trade-off on the front is kept (remove guard:, or give one reward:)"
        )
    if guard.payloads == "validation" and not study.validation_payloads:
        raise ValueError(
            "guard.payloads: validation needs validation_payloads (held-out payload files); add them, "
            "or set guard.payloads: study"
        )
    if not guard.rewards and study.guard_payloads == "study":
        raise ValueError(
            "guard: names no held-out panel (the study's own reward on its own payloads is the proxy "
            "itself); add guard.rewards (other reward models) or validation_payloads"
        )
    labels = [member.label for member in guard.rewards]
    for index, label in enumerate(labels):
        if label in labels[:index]:
            raise ValueError(
                f"guard.rewards[{index}]: the name '{label}' is taken by guard.rewards[{labels.index(label)}]; "
                f"give each its own name, e.g. name: {label}-2"
            )


HUMAN_SAMPLER_KNOBS = ("name", "startup_trials", "warp_margin", "local_every", "local_after", "local_steps")
"""Sampler settings a compare study refuses: it proposes with optuna-dashboard's PreferentialGPSampler."""


def check_human(study: StudyFile) -> None:
    """What a human reward rules out, each a ``ValueError`` naming the field and the fix: pruning and
    previews (nothing scores a partial trial), early stopping (no score to watch), validation payloads
    (no model to score them), a guard, and in compare mode any sampler but the preferential GP."""
    human = study.human
    assert human is not None
    refused = {
        "pruner": study.pruner != "none",
        "multi_fidelity": study.multi_fidelity is not None,
        "early_stopping": study.early_stopping is not None and "early_stopping" in study.model_fields_set,
        "validation_payloads": bool(study.validation_payloads),
        "guard": study.guard is not None,
    }
    for field, given in refused.items():
        if given:
            raise ValueError(
                f"{field}: a human reward has no model score for it (the person judges whole candidates); "
                f"remove {field}: for reward: {{human: …}}"
            )
    if human.mode == "compare":
        for knob in HUMAN_SAMPLER_KNOBS:
            if knob in study.sampler.model_fields_set:
                raise ValueError(
                    f"sampler.{knob}: a compare study proposes with optuna-dashboard's PreferentialGPSampler "
                    "from the person's choices; remove it (sampler.seed still applies)"
                )
    else:
        check_single_objective_sampler(study.sampler.name)


def _payload_content(path: Path) -> list[Any]:
    """Every job of a payload file, at full fidelity and at each preview, as plain data."""
    import dataclasses

    from automerge.render.payload import load_payload

    payload = load_payload(path)
    rungs = [None, *range(len(payload.fidelities))]
    return [[dataclasses.asdict(job) for job in payload.jobs(fidelity=rung)] for rung in rungs]


def _manifest_content(path: Path) -> list[Any]:
    """A reward manifest as parsed (a composite's members too), without comments or formatting."""
    from automerge.config import load_yaml

    data = load_yaml(path)
    content = [data]
    if isinstance(data, dict) and data.get("reward") == "composite":
        for member in data.get("members") or []:
            if isinstance(member, dict) and "manifest" in member:
                member_path = find_manifest(path.parent / str(member["manifest"]), near=path.parent)
                if member_path.is_file():
                    content.append(load_yaml(member_path))
    return content


def load_study_file(path: Path | str) -> StudyFile:
    """Parse and check a study file: files it names must exist (generated models excepted)."""
    path = Path(path)
    study = parse_file(StudyFile, path)
    study._path = path.resolve()
    for name, model in study.models.items():
        if name not in study.generate and not model.exists():
            raise ConfigError(f"{path}: models.{name}: {model} does not exist")
    for name, entries in study.loras.items():
        for index, entry in enumerate(entries):
            if not entry.path.is_file():
                raise ConfigError(f"{path}: models.{name}.loras[{index}]: {entry.path} does not exist")
    for name, spec in study.generate.items():
        if name not in study.models:
            raise ConfigError(f"{path}: generate.{name}: no models.{name} path to write it to")
        if spec.like is not None and spec.like not in study.generate:
            raise ConfigError(f"{path}: generate.{name}.like: '{spec.like}' is not a generated model")
    for field in ("payloads", "validation_payloads"):
        for index, payload in enumerate(getattr(study, field)):
            if not payload.is_file():
                raise ConfigError(f"{path}: {field}[{index}]: payload file {payload} does not exist")
    if isinstance(study.reward, Path):
        object.__setattr__(study, "reward", _manifest(study.reward, path, study, "reward"))  # frozen models
    if study.objectives is not None:
        objectives = [
            objective.model_copy(
                update={"reward": _manifest(objective.reward, path, study, f"objectives[{index}].reward")}
            )
            if isinstance(objective.reward, Path)
            else objective
            for index, objective in enumerate(study.objectives)
        ]
        object.__setattr__(study, "objectives", objectives)
    if study.guard is not None and study.guard.rewards:
        members = [
            member.model_copy(
                update={"reward": _manifest(member.reward, path, study, f"guard.rewards[{index}].reward")}
            )
            if isinstance(member.reward, Path)
            else member
            for index, member in enumerate(study.guard.rewards)
        ]
        object.__setattr__(study.guard, "rewards", members)
    return study


def _manifest(reward: Path, path: Path, study: StudyFile, field: str) -> Path:
    """A reward manifest named by path, or by name: rewards/NAME.yaml beside the study, in the working
    directory or bundled; ``ConfigError`` naming ``field`` when there is none."""
    if reward.is_file():
        return reward
    if reward.suffix in MANIFEST_SUFFIXES:
        raise ConfigError(f"{path}: {field}: manifest {reward} does not exist (see rewards/*.yaml)")
    try:
        return find_manifest(reward.name, near=study.path.parent).resolve()
    except ConfigError as error:
        raise ConfigError(f"{path}: {field}: {error}") from None


def default_storage(study: StudyFile) -> str:
    """The study's storage URL: ``storage:`` (SQLite, PostgreSQL or ``journal:PATH``; see
    ``storage.py``), else ``sqlite:///<study dir>/<study file stem>.db``."""
    from automerge.study.storage import storage_url

    return storage_url(study.storage, study_path=study.path)


def artifact_dir(study: StudyFile) -> Path:
    """The file-system artifact store (the trials' images): ``artifacts:``, else beside the study file."""
    return study.artifacts or study.path.parent / f"{study.path.stem}-artifacts"


def export_dir(study: StudyFile) -> Path:
    """``export.dir``, else ``out/<study name>`` beside the study file."""
    return study.export.dir or study.path.parent / "out" / study.name


def as_plain(value: Any, *, relative_to: Path | None = None) -> Any:
    """Pydantic/Path values → YAML-safe plain data; paths relative to ``relative_to`` when given."""
    if isinstance(value, Path):
        return str(value) if relative_to is None else relative_path(value, relative_to)
    if isinstance(value, dict):
        return {k: as_plain(v, relative_to=relative_to) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_plain(v, relative_to=relative_to) for v in value]
    return value
