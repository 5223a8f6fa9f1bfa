"""Rendering: payload files, offline pipelines (tokenizers, schedulers), deterministic rendering.

Payload and scheduler names load without diffusers; the pipeline and renderer names import diffusers
on first use (PEP 562), so validating a payload file stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from automerge.render.payload import Payload, PayloadItem, RenderJob, RenderSettings, load_payload
from automerge.render.schedulers import SCHEDULERS, make_scheduler

_LAZY = {
    "PipelineModules": "automerge.render.pipeline",
    "build_pipeline": "automerge.render.pipeline",
    "default_dtype": "automerge.render.pipeline",
    "RenderedImage": "automerge.render.renderer",
    "Renderer": "automerge.render.renderer",
    "save_png": "automerge.render.renderer",
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
