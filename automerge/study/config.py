"""Study files (``studies/*.yaml``): what to merge, what to search, how to score, when to stop.

Paths are relative to the study file. Everything that can be checked without loading a model is
checked here (keys, ranges, files that must exist); block names are checked against the family as
soon as the sources' headers are read, still before any tensor is loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from automerge.config import FileRef, Schema, load_yaml, parse_file, parse_model, relative_path
from automerge.errors import ConfigError

_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(text: str | float | int | None) -> float | None:
    """Seconds from ``8h``, ``90m``, ``1h30m``, ``45s`` or a number of seconds; None stays None."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    match = _DURATION.fullmatch(text.strip())
    if not text.strip() or match is None or not any(match.groups()):
        raise ValueError(f"durations look like 8h, 90m, 1h30m or 45s; got '{text}'")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


class SearchParam(Schema):
    """One method parameter to optimize: per block (``blocks``) or per group of blocks (``groups``)."""

    blocks: Literal["all"] | list[str] = "all"
    groups: dict[str, list[str]] | None = None
    low: float = 0.0
    high: float = 1.0
    step: float | None = Field(None, gt=0)
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
        return self


class SamplerConfig(Schema):
    name: Literal["tpe", "gp", "cmaes", "random", "qmc"] = "gp"
    seed: int = 0
    startup_trials: int = Field(10, ge=0)


class EarlyStoppingConfig(Schema):
    patience: int = Field(40, ge=1, description="stop after this many completed trials without improvement")
    min_delta: float = Field(0.002, ge=0, description="an improvement must exceed this")


class ExportConfig(Schema):
    dir: FileRef | None = None
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"


class TinyModelSpec(Schema):
    """A tiny model made on first use (demo, tests, benchmarks): ``automerge tiny`` in a field."""

    tiny: Literal["sd1", "sd2", "sdxl"]
    seed: int = 0
    like: str | None = Field(None, description="letter of another generated model to fine-tune from")
    delta: float = Field(0.05, gt=0)


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


class InlineReward(Schema):
    reference: InlineReference


class RenderConfig(Schema):
    device: str = "auto"
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    batch_size: int = Field(4, ge=1, le=64)
    tokenizer_dir: FileRef | None = None
    compile: bool = False
    offload: bool = Field(
        False, description="sources in pinned host memory, streamed per block (24 GB cards)"
    )
    source_dtype: Literal["same", "fp16", "bf16"] = Field(
        "same", description="storage of the resident sources"
    )


SEARCH_FIELDS = {"models", "method", "search", "params", "seed", "payloads", "reward", "generate"}


def _sha256_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class StudyFile(Schema):
    """A study file, validated; paths resolved relative to it."""

    _typed_path: Path | None = PrivateAttr(None)  # the path as given on the command line

    name: str = Field(min_length=1, max_length=200)
    models: dict[str, FileRef]
    generate: dict[str, TinyModelSpec] = Field(default_factory=dict)
    method: str = "weighted_sum"
    search: dict[str, SearchParam]
    params: dict[str, float | dict[str, float]] = Field(default_factory=dict)
    seed: int = Field(0, ge=0, description="merge seed for random methods")
    payloads: list[FileRef] = Field(min_length=1)
    validation_payloads: list[FileRef] = Field(default_factory=list)
    reward: FileRef | InlineReward
    sampler: SamplerConfig = SamplerConfig()
    pruner: Literal["none", "median"] = "none"
    trials: int = Field(200, ge=1)
    timeout: str | float | None = None
    early_stopping: EarlyStoppingConfig | None = EarlyStoppingConfig()
    baselines: bool = True
    storage: str | None = None
    export: ExportConfig = ExportConfig()
    render: RenderConfig = RenderConfig()

    path: Path | None = Field(None, exclude=True, description="set by the loader")

    @field_validator("models")
    @classmethod
    def _model_letters(cls, models: dict[str, Path]) -> dict[str, Path]:
        for name in models:
            if not re.fullmatch(r"[a-z]", name):
                raise ValueError(f"model names are single letters a, b, c, ...; got '{name}'")
        if "a" not in models or "b" not in models:
            raise ValueError("models a and b are required")
        return dict(sorted(models.items()))

    @field_validator("search")
    @classmethod
    def _search_not_empty(cls, search: dict[str, SearchParam]) -> dict[str, SearchParam]:
        if not search:
            raise ValueError("name at least one method parameter to optimize, e.g. alpha: {blocks: all}")
        return search

    @field_validator("timeout")
    @classmethod
    def _duration(cls, value: str | float | None) -> str | float | None:
        parse_duration(value)
        return value

    @property
    def timeout_seconds(self) -> float | None:
        return parse_duration(self.timeout)

    def search_fingerprint(self) -> str:
        """sha256 of what defines the search problem; the trial budget, timeout, stopping, export and
        storage may change between runs, these may not. Paths count relative to the study file's
        folder, so a study resumes from any working directory and after its project folder moved."""
        assert self.path is not None
        return _sha256_json(as_plain(self.model_dump(include=SEARCH_FIELDS), relative_to=self.path.parent))

    def fingerprint_0_1_0(self) -> str | None:
        """The fingerprint automerge 0.1.0 stored for this file (its paths resolved against the study
        path as typed), so that older studies still resume; None when the file was not loaded from disk."""
        if self._typed_path is None:
            return None
        typed = self._typed_path
        as_typed = parse_model(StudyFile, load_yaml(typed), source=typed, base_dir=typed.parent)
        return _sha256_json(as_typed.model_dump(mode="json", include=SEARCH_FIELDS))


def load_study_file(path: Path | str) -> StudyFile:
    """Parse and check a study file: files it names must exist (generated models excepted)."""
    path = Path(path)
    study = parse_file(StudyFile, path).model_copy(update={"path": path.resolve()})
    study._typed_path = path
    for name, model in study.models.items():
        if name not in study.generate and not model.exists():
            raise ConfigError(f"{path}: models.{name}: {model} does not exist")
    for name, spec in study.generate.items():
        if name not in study.models:
            raise ConfigError(f"{path}: generate.{name}: no models.{name} path to write it to")
        if spec.like is not None and spec.like not in study.generate:
            raise ConfigError(f"{path}: generate.{name}.like: '{spec.like}' is not a generated model")
    for field in ("payloads", "validation_payloads"):
        for index, payload in enumerate(getattr(study, field)):
            if not payload.is_file():
                raise ConfigError(f"{path}: {field}[{index}]: payload file {payload} does not exist")
    if isinstance(study.reward, Path) and not study.reward.is_file():
        raise ConfigError(f"{path}: reward: manifest {study.reward} does not exist (see rewards/*.yaml)")
    return study


def default_storage(study: StudyFile) -> str:
    """``sqlite:///<study dir>/<study file stem>.db`` unless the study names an Optuna RDB URL."""
    if study.storage:
        return study.storage
    assert study.path is not None
    return f"sqlite:///{study.path.with_suffix('.db')}"


def artifact_dir(study: StudyFile) -> Path:
    """The file-system artifact store (trial images) next to the storage."""
    assert study.path is not None
    return study.path.parent / f"{study.path.stem}-artifacts"


def export_dir(study: StudyFile) -> Path:
    assert study.path is not None
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
