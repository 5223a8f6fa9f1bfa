"""automerge: Bayesian block-weight optimizer for Stable Diffusion checkpoint merges.

The public API: what a user may import from ``automerge`` (each subpackage's ``__all__`` names the
rest of its public surface). Names load on first use (PEP 562), so ``import automerge`` stays instant.

    import automerge
    plan = automerge.plan_merge(automerge.load_recipe("recipe.yaml"), source="recipe.yaml")
    automerge.export_merge(plan, Path("merged.safetensors"))
"""

from __future__ import annotations

import importlib
from typing import Any

from automerge._version import __version__

_PUBLIC = {
    # errors
    "AutomergeError": "automerge.errors",
    # checkpoints
    "open_model": "automerge.checkpoints",
    "SourceModel": "automerge.checkpoints",
    # LoRAs
    "read_lora": "automerge.lora",
    "apply_loras": "automerge.lora",
    "extract_lora": "automerge.lora",
    "write_kohya_lora": "automerge.lora",
    # merging
    "METHODS": "automerge.merge",
    "Recipe": "automerge.merge",
    "load_recipe": "automerge.merge",
    "plan_merge": "automerge.merge",
    "open_plan": "automerge.merge",
    "plan_checkpoint": "automerge.merge",
    "MergePlan": "automerge.merge",
    "BlockParams": "automerge.merge",
    "resolve_params": "automerge.merge",
    "export_merge": "automerge.merge",
    "LiveEngine": "automerge.merge",
    "EngineOptions": "automerge.merge",
    # rendering and scoring
    "load_payload": "automerge.render",
    "RenderConfig": "automerge.render",
    "RenderSession": "automerge.render",
    "load_reward": "automerge.rewards",
    # studies
    "StudyFile": "automerge.study",
    "load_study_file": "automerge.study",
    "run_study": "automerge.study",
    "export_study": "automerge.study",
    "find_study": "automerge.study",
    "open_study": "automerge.study",
    # tiny models of the real layouts
    "write_tiny": "automerge.tiny",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
