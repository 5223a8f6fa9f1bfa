"""Reward manifests: the YAML files in ``rewards/`` that say which plug-in to load, where its weight
files are (relative to the manifest), their sha256, where to fetch them, and how to normalise.

A single reward::

    reward: imagereward
    weights: {model: ImageReward.pt, med_config: med_config.json, vocab: vocab.txt}
    sha256: {model: 0f3a…}            # optional, per role or per "role/file" inside a folder role
    hub: {model: {repo: THUDM/ImageReward, files: [ImageReward.pt]}}
    normalize: {kind: affine, scale: 2.0, offset: 5.0}   # (raw − offset) / scale

A composite (``reward: composite``) combines member manifests with weights.
"""

from __future__ import annotations

import math
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from automerge.config import FileRef, Schema, load_yaml, parse_model
from automerge.dtypes import DtypeName
from automerge.errors import ConfigError
from automerge.registry import did_you_mean
from automerge.rewards.base import REWARDS, WeightRole

COMPOSITE = "composite"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class HubSource(Schema):
    """Files of one hub repository: a single file for a file role, or the files of a folder role."""

    repo: str = Field(min_length=3, pattern=r"^[\w.-]+/[\w.-]+$")
    files: tuple[str, ...] = Field(min_length=1)
    revision: str | None = None

    @field_validator("files")
    @classmethod
    def _relative_files(cls, files: tuple[str, ...]) -> tuple[str, ...]:
        for name in files:
            path = PurePosixPath(name)
            if path.is_absolute() or ".." in path.parts or not name:
                raise ValueError(f"hub file '{name}' must be a relative path inside the repository")
        return files


class AffineNormalize(Schema):
    """normalised = (raw − offset) / scale."""

    kind: Literal["affine"]
    scale: float
    offset: float = 0.0

    @field_validator("scale", "offset")
    @classmethod
    def _finite(cls, value: float, info: ValidationInfo) -> float:
        if not math.isfinite(value) or (info.field_name == "scale" and value == 0.0):
            raise ValueError(
                f"{info.field_name} must be a finite number{' other than 0' * (info.field_name == 'scale')}"
            )
        return value

    def apply(self, raw: float) -> float:
        return (raw - self.offset) / self.scale


class NoNormalize(Schema):
    """normalised = raw."""

    kind: Literal["none"] = "none"

    def apply(self, raw: float) -> float:
        return raw


Normalize = Annotated[AffineNormalize | NoNormalize, Field(discriminator="kind")]


class RewardManifest(Schema):
    """One reward model: plug-in name, weight files by role, checks, device, dtype, normalisation."""

    reward: str
    name: str | None = None
    weights: dict[str, FileRef] = Field(default_factory=dict)
    sha256: dict[str, str] = Field(default_factory=dict)
    hub: dict[str, HubSource] = Field(default_factory=dict)
    device: str = "cpu"
    dtype: DtypeName = "fp32"
    batch_size: int = Field(default=8, ge=1)
    normalize: Normalize = Field(default_factory=NoNormalize)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("reward")
    @classmethod
    def _known_plugin(cls, reward: str) -> str:
        if reward not in REWARDS:
            choices = [*REWARDS.names(), COMPOSITE]
            raise ValueError(
                f"unknown reward model '{reward}'{did_you_mean(reward, choices)}; known: {', '.join(sorted(choices))}"
            )
        return reward

    @field_validator("device")
    @classmethod
    def _valid_device(cls, device: str) -> str:
        try:
            torch.device(device)
        except RuntimeError:
            raise ValueError(f"'{device}' is not a torch device (cpu, cuda, cuda:1, mps…)") from None
        return device

    @field_validator("sha256", mode="before")
    @classmethod
    def _hex_digests(cls, digests: Any) -> Any:
        for role, digest in (digests or {}).items() if isinstance(digests, dict) else ():
            if not isinstance(digest, str):
                raise ValueError(
                    f"sha256 of '{role}' must be a quoted string (YAML read {digest!r} as a number)"
                )
            if not _SHA256.match(digest):
                raise ValueError(f"sha256 of '{role}' must be 64 lowercase hex digits")
        return digests

    @field_validator("weights")
    @classmethod
    def _roles_of_plugin(cls, weights: dict[str, Path], info: ValidationInfo) -> dict[str, Path]:
        if "reward" not in info.data:  # the plug-in name failed; that error is reported
            return weights
        reward = info.data["reward"]
        roles = {role.name: role for role in weight_roles(reward)}
        for role in weights:
            if role not in roles:
                raise ValueError(_unknown_role(role, reward, roles))
        for role in roles.values():
            if role.required and role.name not in weights:
                raise ValueError(f"role '{role.name}' is required by reward '{reward}' ({role.what})")
        return weights

    @field_validator("sha256", "hub")
    @classmethod
    def _keys_are_roles(cls, mapping: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "weights" not in info.data or "reward" not in info.data:
            return mapping
        roles = {role.name: role for role in weight_roles(info.data["reward"])}
        for key in mapping:
            role = key.split("/", 1)[0]
            if role not in info.data["weights"]:
                raise ValueError(
                    f"'{key}' names no role under weights{did_you_mean(role, list(info.data['weights']))}"
                )
            if "/" in key and (info.field_name == "hub" or roles[role].kind != "dir"):
                raise ValueError(f"'{key}': only sha256 may name a file inside a folder role")
        return mapping

    def display_name(self, manifest_path: Path) -> str:
        """``name`` when set, else the manifest's file stem (``rewards/pickscore.yaml`` → pickscore)."""
        return self.name or Path(manifest_path).stem


def weight_roles(reward: str) -> tuple[WeightRole, ...]:
    return tuple(REWARDS.get(reward).weight_roles)


def _unknown_role(role: str, reward: str, roles: Any) -> str:
    known = sorted(roles)
    return f"reward '{reward}' has no weight role '{role}'{did_you_mean(role, known)}; roles: {', '.join(known) or '(none)'}"


class CompositeMember(Schema):
    """A member reward: its manifest, its weight, and how its scores are normalised before combining:
    ``manifest`` (the member's own fixed ``normalize``) or ``zscore`` against baseline statistics."""

    manifest: FileRef
    weight: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)
    normalize: Literal["manifest", "zscore"] = "manifest"


class CompositeManifest(Schema):
    """Several rewards combined per image by a weighted arithmetic or geometric mean."""

    reward: Literal["composite"]
    name: str | None = None
    combine: Literal["arithmetic", "geometric"] = "arithmetic"
    members: tuple[CompositeMember, ...] = Field(min_length=1)

    def display_name(self, manifest_path: Path) -> str:
        return self.name or Path(manifest_path).stem


AnyManifest = RewardManifest | CompositeManifest


MANIFEST_SUFFIXES = (".yaml", ".yml")
BUNDLED_MANIFESTS = Path(__file__).resolve().parent.parent.parent / "rewards"
"""The manifests that ship beside the package (a checkout's ``rewards/``)."""


def find_manifest(name: str | Path, *, near: Path | None = None) -> Path:
    """A reward manifest by path or by name: a ``.yaml`` path (or any existing file) is taken as given;
    ``imagereward`` is ``rewards/imagereward.yaml`` looked up beside ``near`` (a study or composite
    file's folder, and its parent), then in the working directory, then beside the package."""
    path = Path(name)
    if path.suffix in MANIFEST_SUFFIXES or path.is_file():
        return path
    stem = path.name
    folders = [Path("rewards"), BUNDLED_MANIFESTS]
    if near is not None:
        folders = [near / "rewards", near.parent / "rewards", near, *folders]
    for folder in folders:
        if (folder / f"{stem}.yaml").is_file():
            return folder / f"{stem}.yaml"
    known = sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.yaml")})
    raise ConfigError(
        f"no reward manifest '{stem}'{did_you_mean(stem, known)}; known: {', '.join(known) or '(none)'}; "
        "or give the path of a manifest .yaml"
    )


def read_manifest(path: Path | str) -> AnyManifest:
    """Parse a reward manifest (single or composite) and its plug-in options; errors name the file
    and the field. Member manifests of a composite are read when the composite is loaded."""
    path = Path(path)
    data = load_yaml(path)
    if isinstance(data, dict) and data.get("reward") == COMPOSITE:
        return parse_model(CompositeManifest, data, source=path, base_dir=path.parent)
    manifest = parse_model(RewardManifest, data, source=path, base_dir=path.parent)
    parse_options(manifest, path)
    return manifest


def parse_options(manifest: RewardManifest, manifest_path: Path) -> Schema:
    """Validate ``options`` with the plug-in's ``Options`` schema (paths relative to the manifest)."""
    options_type: type[Schema] = REWARDS.get(manifest.reward).Options
    return parse_model(
        options_type, manifest.options, source=f"{manifest_path}: options", base_dir=manifest_path.parent
    )
