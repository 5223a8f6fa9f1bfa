"""Which parameters a family's live modules have, and which of them a checkpoint's keys leave unfed
(the completeness check of every model A), without importing diffusers and transformers (~4 s) once
the answer is cached.

The names come from the modules built on the meta device (``automerge.arch.live``) once per configs
and library versions, and are then kept in ``<cache>/live-parameters/<sha256>.json``: the digest of
the configs (sorted JSON) and of the diffusers, transformers and torch versions, so that an upgrade
that renames a parameter asks the modules again. A missing, unreadable or malformed file is rebuilt
(and rewritten atomically); a cache folder that cannot be written is skipped.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

from automerge.files import cache_dir, write_text_atomic

if TYPE_CHECKING:
    from automerge.arch._base import Architecture

CACHE_FOLDER = "live-parameters"
CACHE_FORMAT = 1
_LIBRARIES = ("diffusers", "transformers", "torch")


@dataclass(frozen=True)
class ComponentParameters:
    """One live module's parameter names, and whether they drop ``text_model.`` (transformers ≥ 5.6
    flattened ``CLIPTextModel``; see ``automerge.arch.live.live_name``)."""

    names: frozenset[str]
    flat_text_model: bool


def live_parameters(configs: Mapping[str, Mapping[str, Any]]) -> dict[str, ComponentParameters]:
    """Per component of ``configs``, its live module's parameters (from the cache when there)."""
    return dict(_live_parameters(json.dumps(configs, sort_keys=True)))


def unfed_parameters(
    arch: Architecture, configs: Mapping[str, Mapping[str, Any]], keys: Iterable[str]
) -> dict[str, list[str]]:
    """Per component, the live parameters that none of ``keys`` (a checkpoint's, original layout)
    feeds, sorted; only components with some. A checkpoint with any is incomplete for ``configs``."""
    components = live_parameters(configs)
    fed: dict[str, set[str]] = {component: set() for component in components}
    for key in keys:
        for target in arch.targets(key):
            if target.component in fed:
                flat = components[target.component].flat_text_model
                fed[target.component].add(target.name.removeprefix("text_model.") if flat else target.name)
    missing = {component: sorted(found.names - fed[component]) for component, found in components.items()}
    return {component: names for component, names in missing.items() if names}


def clear_memory_cache() -> None:
    """Forget this process's answers (the files stay): the next call reads the cache folder again."""
    _live_parameters.cache_clear()


@functools.lru_cache(maxsize=8)
def _live_parameters(configs_json: str) -> tuple[tuple[str, ComponentParameters], ...]:
    digest = hashlib.sha256(
        json.dumps([configs_json, _library_versions()], sort_keys=True).encode()
    ).hexdigest()
    path = cache_dir() / CACHE_FOLDER / f"{digest}.json"
    configs = json.loads(configs_json)
    try:
        found = _parsed(path.read_text(encoding="utf-8"), set(configs))
    except (OSError, ValueError):
        found = None
    if found is None:
        found = _built(configs)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, _serialized(found))
        except OSError:
            pass  # the cache is only a shortcut: an unwritable folder costs the build next time
    return tuple(sorted(found.items()))


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def _built(configs: Mapping[str, Mapping[str, Any]]) -> dict[str, ComponentParameters]:
    from automerge.arch.live import build_modules, live_name  # diffusers and transformers

    return {
        component: ComponentParameters(
            frozenset(name for name, _ in module.named_parameters()), live_name(module, "text_model.x") == "x"
        )
        for component, module in build_modules(configs, meta=True).items()
    }


def _serialized(components: Mapping[str, ComponentParameters]) -> str:
    return json.dumps(
        {
            "format": CACHE_FORMAT,
            "components": {
                component: {"names": sorted(found.names), "flat_text_model": found.flat_text_model}
                for component, found in sorted(components.items())
            },
        }
    )


def _parsed(text: str, components: set[str]) -> dict[str, ComponentParameters] | None:
    """The file's components, or None unless it is this format and names exactly ``components``."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        return None
    stored = data.get("components")
    if not isinstance(stored, dict) or set(stored) != components:
        return None
    parsed = {}
    for component, entry in stored.items():
        if not isinstance(entry, dict):
            return None
        names, flat = entry.get("names"), entry.get("flat_text_model")
        if not (
            isinstance(names, list)
            and all(isinstance(name, str) for name in names)
            and isinstance(flat, bool)
        ):
            return None
        parsed[component] = ComponentParameters(frozenset(names), flat)
    return parsed
