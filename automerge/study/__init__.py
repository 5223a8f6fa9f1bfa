"""The optimization loop: study files, search space, samplers, early stopping, the per-trial
objective, trial records, the Pareto front of several objectives, resume and storage, and the
export of a study's trials. The only package
that imports optuna.

Names are imported on first use (as ``automerge``'s own): `automerge export --trial N` checks N
against the storage before diffusers and the render stack load."""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "ObjectiveConfig": "config",
    "SamplerConfig": "config",
    "StudyFile": "config",
    "artifact_dir": "config",
    "default_storage": "config",
    "export_dir": "config",
    "load_study_file": "config",
    "parse_duration": "config",
    "export_study": "export",
    "interop_text": "export",
    "interop_workflow": "export",
    "PickRule": "pareto",
    "parse_pick": "pareto",
    "TrialRecord": "records",
    "best_trial": "records",
    "choose_trial": "records",
    "front_trials": "records",
    "pick_trial": "records",
    "RunSummary": "runner",
    "open_study": "runner",
    "run_study": "runner",
    "Evaluation": "runtime",
    "StudyRuntime": "runtime",
    "MULTI_OBJECTIVE_SAMPLERS": "samplers",
    "SAMPLERS": "samplers",
    "WarpedGPSampler": "samplers",
    "make_multi_objective_sampler": "samplers",
    "make_sampler": "samplers",
    "find_study": "storage",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"automerge.study.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
