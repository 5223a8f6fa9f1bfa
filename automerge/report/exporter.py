"""``automerge export``: the best (or a chosen) trial as ``recipe.yaml``, ``model.safetensors`` and a
self-contained ``report.html``; works at the end of a run and at any time, also while a study runs."""

from __future__ import annotations

import base64
import io
import math
import os
import statistics
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
import yaml
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from automerge.config import relative_path, writable_folder
from automerge.errors import StudyError
from automerge.merge.export import export_merge
from automerge.merge.params import resolve_params
from automerge.merge.recipe import plan_merge
from automerge.report.html import ReportData, render_report
from automerge.study.config import InlineReward, StudyFile, artifact_dir, export_dir
from automerge.study.runtime import study_recipe
from automerge.study.space import SearchSpace, build_space

if TYPE_CHECKING:
    from automerge.study.runtime import StudyRuntime

from automerge.study.runner import MERGE_DEVICE_ATTR


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def choose_trial(study: optuna.Study, number: int | None) -> FrozenTrial:
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        raise StudyError(f"study '{study.study_name}' has no completed trial to export yet")
    if number is None:
        return max(completed, key=lambda t: (t.value, -t.number))
    for trial in completed:
        if trial.number == number:
            return trial
    raise StudyError(
        f"study '{study.study_name}': trial {number} is not a completed trial; "
        f"completed: {', '.join(str(t.number) for t in completed[:20])}"
    )


def export_study(
    study_file: StudyFile,
    *,
    study: optuna.Study,
    runtime: StudyRuntime | None = None,
    trial_number: int | None = None,
    out_dir: Path | None = None,
    console: Console | None = None,
) -> Path:
    """Write recipe.yaml, model.safetensors and report.html for one trial; returns the folder."""
    console = console or Console()
    trial = choose_trial(study, trial_number)
    fix = "pass another folder with -o DIR" if out_dir else "set export.dir in the study file, or pass -o DIR"
    out = writable_folder(Path(out_dir or export_dir(study_file)), fix=fix)
    plan = (
        runtime.plan
        if runtime is not None
        else plan_merge(study_recipe(study_file, study_file.params), source=str(study_file.path))
    )
    try:
        space = runtime.space if runtime is not None else build_space(study_file, plan.arch, plan.method)
        raw = space.raw_params(trial.params)
        params = resolve_params(plan.method, raw, blocks=plan.arch.blocks, source=str(study_file.path))
        # 1. The recipe, loadable by `automerge merge`.
        recipe = study_recipe(study_file, raw).to_yaml_dict()
        recipe["models"] = {name: relative_path(Path(p), out) for name, p in recipe["models"].items()}
        write_text_atomic(out / "recipe.yaml", yaml.safe_dump(recipe, sort_keys=False))
        # 2. The checkpoint, streamed from the sources (on the device the study merged on).
        device = study.user_attrs.get(MERGE_DEVICE_ATTR, "cpu")
        metadata = {
            "automerge.study": study_file.name,
            "automerge.trial": str(trial.number),
            "automerge.score": repr(trial.value),
        }
        with console.status(f"exporting trial {trial.number} to {out / 'model.safetensors'}"):
            export_merge(
                plan.with_params(params),
                out / "model.safetensors",
                dtype=study_file.export.dtype,
                device=device if _device_available(device) else "cpu",
                extra_metadata=metadata,
                title=f"{study_file.name} trial {trial.number}",
            )
        # 3. The report.
        data = report_data(study_file, study, trial, space, runtime=runtime)
        write_text_atomic(out / "report.html", render_report(data))
    finally:
        if runtime is None:
            plan.close()
    console.print(f"exported trial {trial.number} (score {trial.value:.6g}) to {out}/")
    return out


def _device_available(device: str) -> bool:
    import torch

    return not device.startswith("cuda") or torch.cuda.is_available()


def report_data(
    study_file: StudyFile,
    study: optuna.Study,
    best: FrozenTrial,
    space: SearchSpace,
    *,
    runtime: StudyRuntime | None,
) -> ReportData:
    trials = study.get_trials(deepcopy=False)
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    baselines = [t for t in completed if "baseline" in t.user_attrs]
    store = FileSystemArtifactStore(str(artifact_dir(study_file)))
    columns = [(f"best (trial {best.number})", best)] + [
        (t.user_attrs["baseline"], t) for t in baselines if t.number != best.number
    ]
    grid: dict[str, list[str | None]] = {}
    for _label, trial in columns:
        for key in trial.user_attrs.get("images", {}):
            grid.setdefault(key, [None] * len(columns))
    for column, (_label, trial) in enumerate(columns):
        for key, artifact_id in trial.user_attrs.get("images", {}).items():
            grid[key][column] = _artifact_data_uri(store, artifact_id)
    return ReportData(
        title=study_file.name,
        best_number=best.number,
        best_value=float(best.value),
        trial_count=len(trials),
        completed_count=len(completed),
        failed_count=sum(t.state == TrialState.FAIL for t in trials),
        pruned_count=sum(t.state == TrialState.PRUNED for t in trials),
        stop_reason=str(study.user_attrs.get("automerge.stopped", "")),
        columns=[label for label, _ in columns],
        grid=grid,
        curve=[(t.number, float(t.value)) for t in sorted(completed, key=lambda t: t.number)],
        weights=[(d.name, float(best.params[d.name]), d.low, d.high) for d in space.dimensions],
        secret=_secret_weights(study_file, space),
        importances=_importances(study),
        timings=_timing_medians(completed),
        baselines=[(t.user_attrs["baseline"], t.number, float(t.value)) for t in baselines],
        validation=_validation(runtime, space, best, baselines),
    )


def _artifact_data_uri(store: FileSystemArtifactStore, artifact_id: str) -> str | None:
    try:
        with store.open_reader(artifact_id) as reader:
            return "data:image/png;base64," + base64.b64encode(reader.read()).decode()
    except Exception:  # noqa: BLE001 - a missing image leaves a gap in the grid, not a failed export
        return None


def _secret_weights(study_file: StudyFile, space: SearchSpace) -> dict[str, float] | None:
    """For hidden-target studies (the demo): the target's value of each searched dimension."""
    reward = study_file.reward
    if not isinstance(reward, InlineReward) or reward.reference.target is None:
        return None
    target = reward.reference.target.params
    secret = {}
    for dimension in space.dimensions:
        value = target.get(dimension.param)
        if isinstance(value, dict):
            values = [value.get(b, value.get("default", math.nan)) for b in dimension.blocks]
            secret[dimension.name] = float(statistics.fmean(values))
        elif value is not None:
            secret[dimension.name] = float(value)
    return secret


def _importances(study: optuna.Study) -> dict[str, float]:
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 4:
        return {}
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError):
        return {}


def _timing_medians(trials: list[FrozenTrial]) -> dict[str, float]:
    stages: dict[str, list[float]] = {}
    for trial in trials:
        for stage, seconds in trial.user_attrs.get("timings", {}).items():
            stages.setdefault(stage, []).append(float(seconds))
    return {stage: statistics.median(values) for stage, values in stages.items()}


def _validation(
    runtime: StudyRuntime | None, space: SearchSpace, best: FrozenTrial, baselines: list[FrozenTrial]
) -> list[tuple[str, float]]:
    """Held-out payloads, scored once for the best trial and the baselines (needs the live runtime)."""
    if runtime is None or not runtime.validation_jobs:
        return []
    rows = []
    for label, trial in [(f"best (trial {best.number})", best)] + [
        (t.user_attrs["baseline"], t) for t in baselines
    ]:
        evaluation = runtime.evaluate(runtime.params_for(trial.params), runtime.validation_jobs)
        rows.append((label, evaluation.value))
    return rows


def image_bytes(image: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # type: ignore[attr-defined]
    return buffer.getvalue()
