"""The reward plug-in interface: the ``RewardModel`` protocol, the ``REWARDS`` registry of plug-in
classes, and the objects a plug-in receives when it is loaded.

A plug-in is a class registered by name with ``@register_reward("name")``. It declares its weight
files (``weight_roles``), its typed options (``Options``), whether it reads prompts, and a ``load``
classmethod that builds it from a ``LoadRequest``. Its ``score`` returns raw floats, one per image;
normalisation and combination happen in ``automerge.rewards.scoring``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol, runtime_checkable

import torch
from PIL import Image

from automerge.config import Schema
from automerge.errors import RewardError
from automerge.registry import Registry

if TYPE_CHECKING:
    from automerge.rewards.manifest import RewardManifest


@runtime_checkable
class RewardModel(Protocol):
    """Scores images: ``score(images, prompts, keys=...)`` → one raw float per image."""

    name: str

    def score(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        *,
        keys: Sequence[str] | None = None,
    ) -> list[float]: ...


@dataclass(frozen=True)
class WeightRole:
    """One file (or folder) a plug-in loads, named in the manifest's ``weights`` by ``name``."""

    name: str
    kind: Literal["file", "dir"]
    what: str
    required: bool = True


@dataclass(frozen=True)
class RewardContext:
    """What the caller gives a reward beyond its manifest: reference images held in memory
    (key → image) for the ``reference`` plug-in, e.g. a target the demo renders once."""

    reference_images: Mapping[str, Image.Image] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadRequest:
    """Everything a plug-in's ``load`` needs: the parsed manifest, its typed options, the resolved
    weight paths (already checked to exist and to match their sha256), device and dtype."""

    manifest_path: Path
    manifest: RewardManifest
    options: Schema
    weights: Mapping[str, Path]
    device: torch.device
    dtype: torch.dtype
    context: RewardContext

    def weight(self, role: str) -> Path | None:
        return self.weights.get(role)

    def fail(self, message: str) -> RewardError:
        """A ``RewardError`` prefixed with the manifest path."""
        return RewardError(f"{self.manifest_path}: {message}")


class NoOptions(Schema):
    """A plug-in without options: any key under ``options`` is an error."""


REWARDS: Registry[type] = Registry("reward model")
"""Plug-in classes by name. Built-ins are registered by the explicit import list in ``__init__``."""

_REQUIRED_ATTRIBUTES = ("weight_roles", "Options", "uses_prompts", "load", "score")


def register_reward(name: str) -> Callable[[type], type]:
    """Register a plug-in class under ``name``, checking at import time that it has the interface."""

    def wrap(cls: type) -> type:
        missing = [attribute for attribute in _REQUIRED_ATTRIBUTES if not hasattr(cls, attribute)]
        if missing:
            raise TypeError(f"reward plug-in {cls.__name__} lacks {', '.join(missing)}")
        if not (isinstance(cls.Options, type) and issubclass(cls.Options, Schema)):
            raise TypeError(f"reward plug-in {cls.__name__}.Options must be a Schema subclass")
        return REWARDS.register(name, cls)

    return wrap


class RewardPlugin:
    """Optional base class for plug-ins: defaults for the declarative attributes."""

    weight_roles: ClassVar[tuple[WeightRole, ...]] = ()
    Options: ClassVar[type[Schema]] = NoOptions
    uses_prompts: ClassVar[bool] = True


def check_batch(
    images: Sequence[Image.Image], prompts: Sequence[str], keys: Sequence[str] | None, *, name: str
) -> None:
    """Raise ``RewardError`` unless there is one prompt (and one key, when given) per PIL image."""
    if len(prompts) != len(images):
        raise RewardError(f"reward '{name}': got {len(images)} images but {len(prompts)} prompts")
    if keys is not None and len(keys) != len(images):
        raise RewardError(f"reward '{name}': got {len(images)} images but {len(keys)} keys")
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise RewardError(f"reward '{name}': image {index} is a {type(image).__name__}, not a PIL image")
