"""Payload files: the prompts a trial renders, at fixed seeds, and how much each counts.

A payload YAML is a mapping::

    defaults: {steps: 20, cfg: 6.0, width: 512, height: 512, scheduler: euler, seeds: [1, 2]}
    wildcards: wildcards/          # optional, relative to this file; this is the default
    items:
      - {prompt: "a lighthouse on a cliff at dusk, oil painting", weight: 1.0}
      - {prompt: "portrait of an __age__ fisherman, photo", negative_prompt: "blurry", seeds: 4}

Every item field except ``prompt`` may be set under ``defaults:``; an item's own value wins.
``seeds`` is a list of distinct non-negative ints, or a count ``n`` meaning seeds ``0 … n-1``.
``steps``, ``width``, ``height`` and ``seeds`` must be given (on the item or in defaults); the others
default to ``negative_prompt: ""``, ``cfg: 7.0``, ``scheduler: euler``, ``clip_skip: 1`` (A1111
convention: 1 = last CLIP layer) and ``weight: 1``. An item's ``weight`` is its share of the trial
score: each of its images carries ``weight / len(seeds)``.

``fidelities:`` (optional) lists cheaper previews of the same payload, cheapest first, each a change
of ``steps`` and/or a number of ``seeds`` (each item's first n): ``fidelities: [{steps: 4, seeds: 1}]``.
A study with ``multi_fidelity`` renders a trial's previews first and the full payload only for
promising trials.

``__name__`` in a prompt or negative prompt is replaced by one line of ``WILDCARDS/name.txt`` (blank
lines and lines starting with ``#`` are skipped), chosen by a sha256 of (item index, seed, position,
name): the same payload always expands the same way, whatever the process or platform.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pydantic import StrictInt, field_validator, model_validator

from automerge.config import FileRef, Schema, parse_file
from automerge.errors import ConfigError
from automerge.registry import did_you_mean
from automerge.render.schedulers import SCHEDULERS

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed
MAX_SEED_COUNT = 10_000
SIZE_RANGE = (64, 4096)  # pixels; a multiple of 8 (the VAE's downscale factor)
STEPS_RANGE = (1, 200)
CLIP_SKIP_RANGE = (1, 12)
WILDCARD = re.compile(r"__([A-Za-z0-9_\-/]+?)__")

_FALLBACKS: Mapping[str, Any] = {
    "negative_prompt": "",
    "cfg": 7.0,
    "scheduler": "euler",
    "clip_skip": 1,
    "weight": 1.0,
}
_REQUIRED = ("seeds", "steps", "width", "height")


def _in_range(value: int, bounds: tuple[int, int], what: str) -> int:
    low, high = bounds
    if not low <= value <= high:
        raise ValueError(f"{what} must be in [{low}, {high}]")
    return value


class _ItemFields(Schema):
    """The settings an item may take from ``defaults:`` (``None`` = not set here)."""

    negative_prompt: str | None = None
    seeds: list[StrictInt] | StrictInt | None = None
    steps: StrictInt | None = None
    cfg: float | None = None
    width: StrictInt | None = None
    height: StrictInt | None = None
    scheduler: str | None = None
    clip_skip: StrictInt | None = None
    weight: float | None = None

    @field_validator("seeds")
    @classmethod
    def _check_seeds(cls, seeds: list[int] | int | None) -> list[int] | int | None:
        if isinstance(seeds, int):
            _in_range(seeds, (1, MAX_SEED_COUNT), "a seed count")
        elif seeds is not None:
            if not seeds:
                raise ValueError("the seed list is empty; give seeds like [1, 2] or a count like 4")
            for seed in seeds:
                _in_range(seed, (0, MAX_SEED), "every seed")
            if len(set(seeds)) != len(seeds):
                raise ValueError("seeds must be distinct")
        return seeds

    @field_validator("steps")
    @classmethod
    def _check_steps(cls, steps: int | None) -> int | None:
        return steps if steps is None else _in_range(steps, STEPS_RANGE, "steps")

    @field_validator("width", "height")
    @classmethod
    def _check_size(cls, size: int | None) -> int | None:
        if size is not None:
            _in_range(size, SIZE_RANGE, "the size in pixels")
            if size % 8:
                raise ValueError(f"must be a multiple of 8 (try {round(size / 8) * 8})")
        return size

    @field_validator("cfg", "weight")
    @classmethod
    def _check_non_negative(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError("must be a finite number >= 0")
        return value

    @field_validator("scheduler")
    @classmethod
    def _check_scheduler(cls, name: str | None) -> str | None:
        if name is not None and name not in SCHEDULERS:
            known = SCHEDULERS.names()
            raise ValueError(f"unknown scheduler{did_you_mean(name, known)}; known: {', '.join(known)}")
        return name

    @field_validator("clip_skip")
    @classmethod
    def _check_clip_skip(cls, clip_skip: int | None) -> int | None:
        return clip_skip if clip_skip is None else _in_range(clip_skip, CLIP_SKIP_RANGE, "clip_skip")


class _ItemEntry(_ItemFields):
    prompt: str

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        return prompt


class Fidelity(Schema):
    """A cheaper preview of a payload: fewer steps and/or only each item's first ``seeds`` seeds."""

    steps: StrictInt | None = None
    seeds: StrictInt | None = None

    @field_validator("steps")
    @classmethod
    def _check_steps(cls, steps: int | None) -> int | None:
        return steps if steps is None else _in_range(steps, STEPS_RANGE, "steps")

    @field_validator("seeds")
    @classmethod
    def _check_seeds(cls, seeds: int | None) -> int | None:
        return seeds if seeds is None else _in_range(seeds, (1, MAX_SEED_COUNT), "a seed count")

    @model_validator(mode="after")
    def _changes_something(self) -> Fidelity:
        if self.steps is None and self.seeds is None:
            raise ValueError("a fidelity changes steps or seeds, e.g. {steps: 4, seeds: 1}")
        return self


class _PayloadFile(Schema):
    defaults: _ItemFields = _ItemFields()
    items: list[_ItemEntry]
    wildcards: FileRef | None = None
    fidelities: list[Fidelity] = []

    @field_validator("items")
    @classmethod
    def _check_items(cls, items: list[_ItemEntry]) -> list[_ItemEntry]:
        if not items:
            raise ValueError("the item list is empty; add at least one {prompt: ...}")
        return items


@dataclass(frozen=True)
class RenderSettings:
    """What jobs must share to be rendered in one batch."""

    steps: int
    cfg: float
    width: int
    height: int
    scheduler: str
    clip_skip: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RenderJob:
    """One image: a prompt (wildcards expanded) at one seed, with its settings and score weight."""

    key: str  # "i03-s0002": item index and seed, unique within a payload, safe as a file name
    item: int
    seed: int
    prompt: str
    negative_prompt: str
    steps: int
    cfg: float
    width: int
    height: int
    scheduler: str
    clip_skip: int
    weight: float  # the item's weight / its number of seeds

    @property
    def settings(self) -> RenderSettings:
        return RenderSettings(self.steps, self.cfg, self.width, self.height, self.scheduler, self.clip_skip)


@dataclass(frozen=True)
class PayloadItem:
    """One validated item with every setting resolved (item value, else defaults, else fallback)."""

    prompt: str
    negative_prompt: str
    seeds: tuple[int, ...]
    steps: int
    cfg: float
    width: int
    height: int
    scheduler: str
    clip_skip: int
    weight: float


@dataclass(frozen=True)
class Payload:
    """A loaded payload file: resolved items and the wildcard options their prompts use."""

    source: Path
    items: tuple[PayloadItem, ...]
    wildcards: Mapping[str, tuple[str, ...]]
    fidelities: tuple[Fidelity, ...] = ()

    def jobs(self, *, fidelity: int | None = None) -> list[RenderJob]:
        """Every (item, seed) as a ``RenderJob``, item-major, seeds in the order given; at
        ``fidelity`` (an index into ``fidelities``), the preview's steps and seeds."""
        items = (
            self.items
            if fidelity is None
            else tuple(_preview(i, self.fidelities[fidelity]) for i in self.items)
        )
        return [self._job(index, item, seed) for index, item in enumerate(items) for seed in item.seeds]

    def _job(self, index: int, item: PayloadItem, seed: int) -> RenderJob:
        return RenderJob(
            key=job_key(index, seed),
            item=index,
            seed=seed,
            prompt=expand_wildcards(item.prompt, self.wildcards, item=index, seed=seed, part="prompt"),
            negative_prompt=expand_wildcards(
                item.negative_prompt, self.wildcards, item=index, seed=seed, part="negative"
            ),
            steps=item.steps,
            cfg=item.cfg,
            width=item.width,
            height=item.height,
            scheduler=item.scheduler,
            clip_skip=item.clip_skip,
            weight=item.weight / len(item.seeds),
        )


def _preview(item: PayloadItem, fidelity: Fidelity) -> PayloadItem:
    """``item`` at ``fidelity``: its steps replaced, its seeds cut to the first n (its weight kept)."""
    return dataclasses.replace(
        item,
        steps=item.steps if fidelity.steps is None else fidelity.steps,
        seeds=item.seeds if fidelity.seeds is None else item.seeds[: fidelity.seeds],
    )


def job_key(item: int, seed: int) -> str:
    """``i03-s0002``: zero-padded item index and seed (wider numbers simply take more digits)."""
    return f"i{item:02d}-s{seed:04d}"


def expand_wildcards(
    text: str, options: Mapping[str, tuple[str, ...]], *, item: int, seed: int, part: str
) -> str:
    """Replace each ``__name__`` with ``options[name][h % len]``, h = sha256(item|seed|part|n|name)."""
    count = 0

    def choose(match: re.Match[str]) -> str:
        nonlocal count
        name = match.group(1)
        digest = hashlib.sha256(f"{item}|{seed}|{part}|{count}|{name}".encode()).digest()
        count += 1
        choices = options[name]
        return choices[int.from_bytes(digest[:8], "big") % len(choices)]

    return WILDCARD.sub(choose, text)


def load_payload(path: Path | str) -> Payload:
    """Read and validate a payload YAML; every problem is a one-line ``ConfigError`` naming the field."""
    path = Path(path)
    raw = parse_file(_PayloadFile, path)
    items = tuple(_resolve_item(raw.defaults, entry, path=path, index=i) for i, entry in enumerate(raw.items))
    if not any(item.weight > 0 for item in items):
        raise ConfigError(f"{path}: every item has weight 0; give at least one item a weight > 0")
    folder = raw.wildcards if raw.wildcards is not None else path.parent / "wildcards"
    if raw.wildcards is not None and not folder.is_dir():
        raise ConfigError(f"{path}: field 'wildcards': folder {folder} not found")
    wildcards = MappingProxyType(_load_wildcards(items, folder, path=path))
    return Payload(source=path, items=items, wildcards=wildcards, fidelities=tuple(raw.fidelities))


def _resolve_item(defaults: _ItemFields, entry: _ItemEntry, *, path: Path, index: int) -> PayloadItem:
    given = {**defaults.model_dump(exclude_none=True), **entry.model_dump(exclude_none=True)}
    values = {**_FALLBACKS, **given}
    for name in _REQUIRED:
        if name not in values:
            raise ConfigError(
                f"{path}: field 'items.{index}.{name}' is required: set it on the item or under defaults:"
            )
    seeds = values["seeds"]
    values["seeds"] = tuple(range(seeds)) if isinstance(seeds, int) else tuple(seeds)
    return PayloadItem(**values)


def _load_wildcards(
    items: tuple[PayloadItem, ...], folder: Path, *, path: Path
) -> dict[str, tuple[str, ...]]:
    """The options of every wildcard the items use, read from ``folder/name.txt``."""
    options: dict[str, tuple[str, ...]] = {}
    for index, item in enumerate(items):
        for field_name in ("prompt", "negative_prompt"):
            for name in WILDCARD.findall(getattr(item, field_name)):
                if name not in options:
                    where = f"{path}: field 'items.{index}.{field_name}': wildcard __{name}__"
                    options[name] = _read_wildcard_file(folder / f"{name}.txt", where=where)
    return options


def _read_wildcard_file(file: Path, *, where: str) -> tuple[str, ...]:
    if not file.is_file():
        raise ConfigError(f"{where}: file {file} not found (one option per line)")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{where}: cannot read {file} as UTF-8 text ({error})") from None
    choices = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not choices:
        raise ConfigError(f"{where}: {file} has no options (blank lines and # comments are skipped)")
    nested = [choice for choice in choices if WILDCARD.search(choice)]
    if nested:
        raise ConfigError(f"{where}: {file} option {nested[0]!r} uses a wildcard; nesting is not supported")
    return choices
