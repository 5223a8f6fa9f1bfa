"""Rendering: payload files, offline pipelines (tokenizers, schedulers), deterministic rendering, and
``RenderSession``, the one builder of plan → live engine → modules → pipeline → renderer.

Payload and scheduler names load without torch or diffusers; the others import them on first use
(PEP 562), so validating a payload file stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from automerge.quiet import drop_torchvision_notice
from automerge.render.payload import Payload, PayloadItem, RenderJob, RenderSettings, load_payload
from automerge.render.schedulers import SCHEDULERS, make_scheduler

drop_torchvision_notice()  # before a render module imports diffusers (all of them load lazily)

_LAZY = {
    "RenderConfig": "automerge.render.config",
    "RenderSession": "automerge.render.session",
    "PipelineModules": "automerge.render.pipeline",
    "build_pipeline": "automerge.render.pipeline",
    "pipeline_modules": "automerge.render.pipeline",
    "RenderedImage": "automerge.render.renderer",
    "Renderer": "automerge.render.renderer",
    "save_png": "automerge.render.renderer",
    "build_modules": "automerge.render.modules",
    "bind_modules": "automerge.render.modules",
    "TokenizerCache": "automerge.render.tokenizers",
    "clip_tokenizer": "automerge.render.tokenizers",
}

__all__ = [
    "SCHEDULERS",
    "Payload",
    "PayloadItem",
    "RenderJob",
    "RenderSettings",
    "load_payload",
    "make_scheduler",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
