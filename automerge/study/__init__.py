"""The optimization loop: study files, search space, samplers, early stopping, the per-trial
objective, trial records, resume and storage, and the export of a study's trials. The only package
that imports optuna."""

from automerge.study.config import (
    SamplerConfig,
    StudyFile,
    artifact_dir,
    default_storage,
    export_dir,
    load_study_file,
    parse_duration,
)
from automerge.study.export import export_study
from automerge.study.records import TrialRecord, best_trial
from automerge.study.runner import RunSummary, find_study, open_study, run_study
from automerge.study.runtime import Evaluation, StudyRuntime
from automerge.study.samplers import SAMPLERS, WarpedGPSampler, make_sampler

__all__ = [
    "SAMPLERS",
    "SamplerConfig",
    "Evaluation",
    "RunSummary",
    "StudyFile",
    "StudyRuntime",
    "TrialRecord",
    "WarpedGPSampler",
    "artifact_dir",
    "best_trial",
    "default_storage",
    "export_dir",
    "export_study",
    "load_study_file",
    "make_sampler",
    "find_study",
    "open_study",
    "parse_duration",
    "run_study",
]
