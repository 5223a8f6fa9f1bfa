"""Reads the family data files (every ``data/families/*.yaml``) into ``Architecture``s and registers
them, and reads the unsupported-family markers (``data/unsupported.yaml``). Adding a family is adding
a data file (and, for a new kind of key, a rule in ``_rules.py``)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from automerge.arch._base import ARCHITECTURES, Architecture, Component
from automerge.arch._rules import BLOCK_RULES, KEY_RULES, fixed_block
from automerge.arch._schema import BlockLevels, ComponentSpec, Config, FamilyFile, UnsupportedFile
from automerge.config import parse_file
from automerge.errors import ConfigError

DATA = Path(__file__).parent / "data"
FAMILIES = DATA / "families"
UNSUPPORTED = DATA / "unsupported.yaml"


def register_families(folder: Path = FAMILIES) -> list[Architecture]:
    """Load every ``*.yaml`` in ``folder`` (in name order) and register it in ``ARCHITECTURES``."""
    loaded = [load_family(path) for path in sorted(folder.glob("*.yaml"))]
    for arch in loaded:
        ARCHITECTURES.register(arch.name, arch)
    return loaded


def load_family(path: Path) -> Architecture:
    """One family data file as an ``Architecture``; a bad file is a ``ConfigError`` naming the field."""
    spec = parse_file(FamilyFile, path)
    if spec.name != path.stem:
        raise ConfigError(f"{path}: field 'name': must be the file's name '{path.stem}', got '{spec.name}'")
    return Architecture(
        name=spec.name,
        title=spec.title,
        modelspec_architecture=spec.modelspec_architecture,
        blocks=spec.blocks.names(),
        components=tuple(_component(component, spec.blocks) for component in spec.components),
        configs=spec.configs,
        tiny_configs=_tiny_configs(spec.configs, spec.tiny),
        reference=spec.reference,
        pipeline=spec.pipeline,
        detection=spec.detection,
        kohya=spec.kohya,
        prediction_type=spec.prediction_type,
        aliases=tuple((alias.old, alias.new) for alias in spec.aliases),
    )


def load_unsupported(path: Path = UNSUPPORTED) -> UnsupportedFile:
    return parse_file(UnsupportedFile, path)


def _component(spec: ComponentSpec, levels: BlockLevels) -> Component:
    """The live component: its key rule and block rule made from their registered factories."""
    rule = KEY_RULES.get(spec.keys.rule)(spec.name, **spec.keys.args)
    if isinstance(spec.block, str):
        block = fixed_block(spec.block)
    else:
        factory = BLOCK_RULES.get(spec.block.rule)
        block = factory(levels_in=levels.levels_in, levels_out=levels.levels_out, **spec.block.args)
    return Component(spec.name, spec.prefix, rule, block)


def _tiny_configs(configs: Mapping[str, Config], tiny: Mapping[str, Config]) -> dict[str, dict[str, Any]]:
    """Each real config with its tiny options merged on (a copy: nothing shared with the real one)."""
    return {name: copy.deepcopy({**config, **tiny.get(name, {})}) for name, config in configs.items()}
