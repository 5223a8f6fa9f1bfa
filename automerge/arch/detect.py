"""Family detection for both layouts, driven by the families' data files (their ``detection`` section)
and the unsupported-family markers (``data/unsupported.yaml``).

An original-layout file shows its keys and shapes; a diffusers folder its component sub-folders and
their ``config.json``. Both go through the same steps (``_detect``), with the markers diffusers'
``infer_diffusers_model_type`` uses: a recognised but unsupported family (SD3, Flux, SDXL refiner) or a
UNet input of other than the family's channels (inpainting, instruct-pix2pix) is named in an
``UnsupportedModelError``; then the family whose text encoders are there (key prefixes, or sub-folders
and config values: at any width, tiny included); then, with no text encoder, the family of the UNet's
cross-attention width. Anything else is a ``CheckpointError``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Protocol

from automerge.arch._base import ARCHITECTURES, Architecture
from automerge.arch._loader import load_unsupported
from automerge.arch._schema import UnsupportedFamily
from automerge.errors import CheckpointError, UnsupportedModelError

ShapeOf = Callable[[str], tuple[int, ...]]
FolderConfigs = Mapping[str, Mapping[str, Any]]
"""The ``config.json`` of each component sub-folder of a diffusers folder, by sub-folder name."""

_UNSUPPORTED = load_unsupported()
_UNET_FOLDER = "unet"  # diffusers' name for the UNet sub-folder, whatever the family
_DIFFUSERS_IN_CHANNELS = 4  # UNet2DConditionModel's default when config.json leaves it out


def detect_architecture(keys: Collection[str], shape_of: ShapeOf, *, source: str) -> Architecture:
    """The family of an original-layout checkpoint from its keys and shapes; ``source`` names it in errors."""
    return _detect(_FileEvidence(keys, shape_of, source=source), source=source)


def detect_folder_architecture(configs: FolderConfigs, *, source: str) -> Architecture:
    """The family of a diffusers folder from the ``config.json`` of its component sub-folders."""
    return _detect(_FolderEvidence(configs), source=source)


class _Evidence(Protocol):
    """What one layout shows of a checkpoint, asked in the terms of the family data."""

    def has_marker(self, family: UnsupportedFamily) -> bool: ...

    def unet_channels(self, arch: Architecture) -> int | None: ...  # None: no UNet input of arch's

    def has_text_encoders(self, arch: Architecture) -> bool: ...

    def cross_attention_width(self, arch: Architecture) -> int | None: ...  # None: not shown

    def no_unet(self, archs: Sequence[Architecture]) -> str: ...

    def no_cross_attention(self, archs: Sequence[Architecture]) -> str: ...


def _detect(evidence: _Evidence, *, source: str) -> Architecture:
    """The one family ``evidence`` fits; ``source`` (the file or folder) starts every error."""
    # 1. Recognised families that automerge does not support yet.
    for family in _UNSUPPORTED.families:
        if evidence.has_marker(family):
            raise UnsupportedModelError(f"{source}: {family.name} checkpoints are not supported yet")
    # 2. A UNet with the input channels of a family.
    candidates = _by_unet_input(evidence, source=source)
    # 3. The family whose text encoders are there, at any width.
    matches = [arch for arch in candidates if evidence.has_text_encoders(arch)]
    if len(matches) > 1:
        names = ", ".join(arch.name for arch in matches)
        raise CheckpointError(f"{source}: holds the text encoders of several families ({names})")
    if matches:
        return matches[0]
    # 4. No text encoder: the UNet's cross-attention width.
    return _by_cross_attention(evidence, candidates, source=source)


def _by_unet_input(evidence: _Evidence, *, source: str) -> list[Architecture]:
    """The families whose UNet input the checkpoint has, with their number of input channels."""
    archs = [arch for _, arch in ARCHITECTURES.items()]
    channels = {arch.name: found for arch in archs if (found := evidence.unet_channels(arch)) is not None}
    if not channels:
        raise CheckpointError(f"{source}: {evidence.no_unet(archs)}")
    fitting = [arch for arch in archs if channels.get(arch.name) == arch.detection.unet_input.channels]
    if not fitting:
        found = next(iter(channels.values()))
        kind = _UNSUPPORTED.unet_in_channels.get(found, f"{found}-channel")
        raise UnsupportedModelError(
            f"{source}: {kind} checkpoints (UNet input with {found} channels) are not supported yet"
        )
    return fitting


def _by_cross_attention(evidence: _Evidence, candidates: list[Architecture], *, source: str) -> Architecture:
    """The one family that is told by its UNet alone and has the checkpoint's cross-attention width."""
    told = [(arch, arch.detection.unet_only) for arch in candidates if arch.detection.unet_only is not None]
    widths = {arch.name: evidence.cross_attention_width(arch) for arch, _ in told}
    shown = sorted({width for width in widths.values() if width is not None})
    if not shown:
        raise CheckpointError(f"{source}: {evidence.no_cross_attention([arch for arch, _ in told])}")
    matches = [arch for arch, unet_only in told if widths[arch.name] == unet_only.width]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(f"{arch.name} {unet_only.width}" for arch, unet_only in told)
    raise CheckpointError(
        f"{source}: UNet without text encoder and with cross-attention width {shown[0]}: unknown SD "
        f"variant (known widths: {known})"
    )


class _FileEvidence:
    """An original-layout (A1111 / LDM / sgm) single file: its tensor keys and their shapes."""

    def __init__(self, keys: Collection[str], shape_of: ShapeOf, *, source: str) -> None:
        self.keys, self.shape_of, self.source = keys, shape_of, source

    def has_marker(self, family: UnsupportedFamily) -> bool:
        ending = family.key_ending
        return ending is not None and any(key.endswith(ending) for key in self.keys)

    def unet_channels(self, arch: Architecture) -> int | None:
        key = arch.detection.unet_input.key
        return self._shape(key, rank=4, what="UNet input convolution")[1] if key in self.keys else None

    def has_text_encoders(self, arch: Architecture) -> bool:
        return any(key.startswith(arch.detection.key_prefixes) for key in self.keys)

    def cross_attention_width(self, arch: Architecture) -> int | None:
        unet_only = arch.detection.unet_only
        if unet_only is None or unet_only.key not in self.keys:
            return None
        return self._shape(unet_only.key, rank=2, what="cross-attention projection")[-1]

    def _shape(self, key: str, *, rank: int, what: str) -> tuple[int, ...]:
        """The shape of ``key``, which must have ``rank`` dimensions (a malformed file: one-line error)."""
        shape = tuple(self.shape_of(key))
        if len(shape) != rank:
            raise CheckpointError(
                f"{self.source}: tensor '{key}' has shape {list(shape)}; a SD {what} is {rank}-D: the file is damaged "
                "or not a Stable Diffusion checkpoint"
            )
        return shape

    def no_unet(self, archs: Sequence[Architecture]) -> str:
        wanted = " or ".join(f"'{key}'" for key in sorted({a.detection.unet_input.key for a in archs}))
        return (
            "not a Stable Diffusion checkpoint in the original (A1111/LDM) layout: "
            f"no {wanted} among its {len(self.keys)} tensors"
        )

    def no_cross_attention(self, archs: Sequence[Architecture]) -> str:
        keys = sorted({arch.detection.unet_only.key for arch in archs if arch.detection.unet_only})
        where = " or ".join(f"'{key}'" for key in keys) or "any key a family is told by"
        return f"UNet without cross-attention at {where}: unknown SD variant"


class _FolderEvidence:
    """A diffusers folder: which component sub-folders it has and their ``config.json``."""

    def __init__(self, configs: FolderConfigs) -> None:
        self.configs = configs

    def has_marker(self, family: UnsupportedFamily) -> bool:
        has = all(folder in self.configs for folder in family.folders)
        lacks = not any(folder in self.configs for folder in family.without_folders)
        return bool(family.folders) and has and lacks

    def unet_channels(self, arch: Architecture) -> int | None:
        unet = self.configs.get(_UNET_FOLDER)
        return None if unet is None else unet.get("in_channels", _DIFFUSERS_IN_CHANNELS)

    def has_text_encoders(self, arch: Architecture) -> bool:
        """Its required sub-folders and no foreign one are there, with its config values."""
        detection, present = arch.detection, set(self.configs)
        own = {component.name for component in arch.components}
        if not set(detection.folders) <= present <= own:
            return False
        return all(
            self.configs.get(folder, {}).get(option) == value
            for folder, options in detection.folder_configs.items()
            for option, value in options.items()
        )

    def cross_attention_width(self, arch: Architecture) -> int | None:
        own = {component.name for component in arch.components}
        if arch.detection.unet_only is None or not set(self.configs) <= own:
            return None
        return self.configs.get(_UNET_FOLDER, {}).get("cross_attention_dim")

    def no_unet(self, archs: Sequence[Architecture]) -> str:
        return f"diffusers folder without {_UNET_FOLDER}/config.json"

    def no_cross_attention(self, archs: Sequence[Architecture]) -> str:
        return (
            f"{_UNET_FOLDER}/config.json has no cross_attention_dim and no text encoder: unknown SD variant"
        )
