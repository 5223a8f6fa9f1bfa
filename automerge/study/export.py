"""``automerge export``: a study's best (or a chosen) trial as ``recipe.yaml``, ``model.safetensors``
and a self-contained ``report.html``; at the end of a run, or at any time, also while a study runs.

The trial's parameters become a ``MergePlan`` through the search space (no re-parsed recipe), so the
recipe, the checkpoint and its header describe the same merge; the report's data is gathered here and
drawn by ``automerge.report``.
"""

from __future__ import annotations

import base64
import io
import json
import re
import statistics
import warnings
from pathlib import Path

import optuna
import torch
import yaml
from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from automerge.errors import ConfigError
from automerge.files import foreign_files, relative_path, replaced_folder, writable_folder, write_text_atomic
from automerge.interop import ComfyWorkflow, comfyui_workflow, mecha_recipe, supermerger_recipe
from automerge.merge import MergePlan, export_merge
from automerge.report import (
    GridCell,
    GuardData,
    Margin,
    ParetoData,
    ParetoPoint,
    ReportData,
    recovery_line,
    render_report,
)
from automerge.study import records
from automerge.study.config import InlineReward, StudyFile, artifact_dir, export_dir
from automerge.study.guard import agreed_trial, guard_verdict, read_checks
from automerge.study.pareto import KNEE, PickRule
from automerge.study.records import TrialRecord
from automerge.study.runtime import Evaluation, StudyRuntime, open_study_plan
from automerge.study.space import SearchSpace, build_space, target_params


def export_study(
    study_file: StudyFile,
    *,
    study: optuna.Study,
    runtime: StudyRuntime | None = None,
    trial_number: int | None = None,
    out_dir: Path | None = None,
    console: Console | None = None,
    pick: PickRule | None = None,
) -> Path:
    """Write recipe.yaml, model.safetensors and report.html for one trial; returns the folder.
    ``runtime``: the running study's (its open sources are reused, validation payloads scored).
    With several objectives and no ``trial_number``, the front trial ``pick`` chooses (default: the
    knee point), said in one line."""
    console = console or Console()
    how = ""
    guarded = _guard_choice(study_file, study) if trial_number is None and pick is None else None
    if guarded is not None:
        agreed, reason = guarded
        if study_file.guard is not None and study_file.guard.stop:
            trial_number = agreed
            how = f"exporting trial {agreed}, the last best the guard agreed with (guard.stop)"
            console.print(how, highlight=False)
        else:
            console.print(
                f"[yellow]{reason}[/]; exporting the best anyway (guard.stop is off); "
                f"automerge export --trial {agreed} exports the last agreed best",
                highlight=False,
            )
    trial = records.choose_trial(study, trial_number, pick=pick)
    if records.multi_objective(study):
        how = (
            records.pick_trial(study, pick or KNEE).reason
            if trial_number is None
            else f"chosen with --trial {trial_number}"
        )
        if trial_number is None:
            console.print(how, highlight=False)
    fix = "pass another folder with -o DIR" if out_dir else "set export.dir in the study file, or pass -o DIR"
    out = Path(out_dir or export_dir(study_file)).absolute()
    check_export_folder(out, fix=fix)
    plan = runtime.plan if runtime is not None else open_study_plan(study_file)
    try:
        space = (
            runtime.space
            if runtime is not None
            else build_space(study_file, plan.arch, plan.method, model_names=plan.model_names)
        )
        trial_plan = plan.with_params(space.block_params(trial.params))
        with replaced_folder(out) as staged:  # the folder always holds one trial's three files
            # 1. The recipe, loadable by `automerge merge` from anywhere (paths relative to itself).
            recipe = trial_plan.recipe().to_yaml_dict(model_path=lambda path: relative_path(path, out))
            write_text_atomic(staged / "recipe.yaml", yaml.safe_dump(recipe, sort_keys=False))
            # 2. The checkpoint, streamed from the sources (on the device the study merged on).
            _export_checkpoint(trial_plan, staged / "model.safetensors", study_file, study, trial, console)
            # 3. The report.
            data = report_data(study_file, study, trial, space, plan=plan, runtime=runtime, how=how)
            write_text_atomic(staged / "report.html", render_report(data))
    finally:
        if runtime is None:
            plan.close()
    console.print(f"exported trial {trial.number} ({_scores_text(study, trial)}) to {out}/")
    console.print(f"report: {out / 'report.html'}")
    recovered = recovery_line(data)
    if recovered is not None:
        console.print(recovered)
    return out


EXPORT_FILES = ("recipe.yaml", "model.safetensors", "report.html")


def _guard_choice(study_file: StudyFile, study: optuna.Study) -> tuple[int, str] | None:
    """(the last best the guard agreed with, why) when the study has a guard that disagrees with its
    best; None otherwise (and for studies with several objectives, which have no guard)."""
    if study_file.guard is None or records.multi_objective(study):
        return None
    return agreed_trial(study, tolerance=study_file.guard.tolerance)


def _scores_text(study: optuna.Study, trial: FrozenTrial) -> str:
    """``score 0.91``; with several objectives ``near-a -0.00123, near-b -0.0456``; a compare study's
    candidates have no score (the person's choices rank them)."""
    if study.user_attrs.get(records.HUMAN) == "compare":
        return "the person's preferred candidate"
    if not records.multi_objective(study):
        return f"score {trial.value:.6g}"
    names = records.objective_names(study)
    return ", ".join(f"{name} {value:.6g}" for name, value in zip(names, trial.values, strict=True))


def check_export_folder(out: Path, *, fix: str) -> None:
    """The export folder is replaced as a whole: it must hold nothing but an earlier export, and its
    parent must be writable."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export folder {out} is a file; {fix}")
    foreign = foreign_files(out, EXPORT_FILES)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(
            f"export folder {out} holds other files ({shown}) and an export replaces the whole folder; "
            f"{fix} (a new or empty folder)"
        )
    try:
        writable_folder(out.parent, fix=fix)
    except ConfigError as error:
        raise ConfigError(f"export folder {out}: {error}") from None


def _export_checkpoint(
    plan: MergePlan,
    path: Path,
    study_file: StudyFile,
    study: optuna.Study,
    trial: FrozenTrial,
    console: Console,
) -> None:
    device = study.user_attrs.get(records.MERGE_DEVICE, "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        device = "cpu"
    metadata = {"automerge.study": study_file.name, "automerge.trial": str(trial.number)}
    if records.multi_objective(study):
        names = records.objective_names(study)
        metadata["automerge.scores"] = json.dumps(dict(zip(names, trial.values, strict=True)))
    else:
        metadata["automerge.score"] = repr(trial.value)
    with console.status(f"exporting trial {trial.number} to {path}"):
        export_merge(
            plan,
            path,
            device=device,
            extra_metadata=metadata,
            title=f"{study_file.name} trial {trial.number}",
        )


def interop_text(
    study_file: StudyFile, output_format: str, *, study: optuna.Study, trial_number: int | None = None
) -> str:
    """The trial's merge as a recipe for another tool (``interop``): ``supermerger`` (what to set in
    its Merge tab) or ``mecha`` (sd-mecha's recipe text). Reads only headers."""
    trial = records.choose_trial(study, trial_number)
    title = f"{study_file.name} trial {trial.number}"
    plan = open_study_plan(study_file)
    try:
        _refuse_foreign_sources(plan, output_format, diffusers_folders=True)
        space = build_space(study_file, plan.arch, plan.method, model_names=plan.model_names)
        params = space.block_params(trial.params)
        if output_format == "mecha":
            models = {name: model.path.absolute() for name, model in plan.sources.items()}
            return mecha_recipe(
                plan.method.name, params, plan.arch.name, plan.arch.merge_blocks, models, title=title
            )
        names = [model.path.name for model in plan.sources.values()]
        return supermerger_recipe(plan.method.name, params, plan.arch.merge_blocks, names).text(title=title)
    finally:
        plan.close()


def _refuse_foreign_sources(
    plan: MergePlan, output_format: str, *, diffusers_folders: bool, loras: bool = False
) -> None:
    """``ConfigError`` for a source the other tool's recipe cannot name as it is: one with LoRAs where
    the recipe cannot apply them (it would merge the bare checkpoint), or a diffusers folder where the
    tool loads single files."""
    for name, model in plan.sources.items():
        if plan.loras.get(name) and not loras:
            why = "carries LoRAs, which the recipe would not apply"
        elif model.layout != "original" and not diffusers_folders:
            why = "is a diffusers folder (CheckpointLoaderSimple loads single-file checkpoints)"
        else:
            continue
        raise ConfigError(
            f"--format {output_format}: model {name} ({model.path}) {why}; export the merged checkpoint "
            "instead (automerge export without --format)"
        )


def interop_workflow(
    study_file: StudyFile, *, study: optuna.Study, trial_number: int | None = None
) -> ComfyWorkflow:
    """The trial's merge as a ComfyUI workflow (its API JSON and UI graph) that loads the sources by
    file name from ComfyUI's models/checkpoints. Reads only headers."""
    trial = records.choose_trial(study, trial_number)
    plan = open_study_plan(study_file)
    try:
        _refuse_foreign_sources(plan, "comfyui", diffusers_folders=False, loras=True)
        params = build_space(study_file, plan.arch, plan.method, model_names=plan.model_names).block_params(
            trial.params
        )
        return comfyui_workflow(
            plan.method.name,
            params,
            plan.arch.name,
            {name: model.path.name for name, model in plan.sources.items()},
            title=f"{study_file.name} trial {trial.number}",
            save_name=f"{study_file.name}-trial{trial.number}",
            loras={
                letter: [(lora.path.name, params.lora_strengths[name]) for name, lora in entries]
                for letter, entries in plan.loras.items()
            },
        )
    finally:
        plan.close()


def report_data(
    study_file: StudyFile,
    study: optuna.Study,
    exported: FrozenTrial,
    space: SearchSpace,
    *,
    plan: MergePlan,
    runtime: StudyRuntime | None,
    how: str = "",
) -> ReportData:
    """Everything report.html shows, from the study's trial records; with several objectives, the
    Pareto front (``how``: how the exported trial was chosen) instead of a best."""
    trials = records.records(study)
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    several = records.multi_objective(study)
    best = TrialRecord.of(exported if several else records.choose_trial(study, None))
    chosen = TrialRecord.of(exported)
    baselines = [t for t in completed if t.baseline is not None]
    title = (
        f"{'best' if chosen.number == best.number and not several else 'exported'} (trial {chosen.number})"
    )
    columns = [(title, chosen)] + [(t.label, t) for t in baselines if t.number != chosen.number]
    store = FileSystemArtifactStore(str(artifact_dir(study_file)))
    grid = _image_grid([record for _, record in columns], store)
    references = {} if several else _reference_images(study_file, runtime)  # one column per target: not yet
    if references:
        for key, cells in grid.items():
            cells.append((references.get(key), None))
    rows = [(title, chosen), *((t.label, t) for t in baselines)]  # the exported trial, then the baselines
    validated = _validation(runtime, space, rows)
    if validated:
        per_image = {label: evaluation.image_scores for label, evaluation in validated}
        confidence_source = "the validation payloads (held out from the search)"
    else:
        per_image = {label: dict(record.image_scores) for label, record in rows}
        confidence_source = (
            "the study's own payloads (no validation_payloads: the search optimized these, so the margin "
            "favours the best)"
        )
    if several:  # the exported trial is a trade-off: no margin over the baselines in one score
        per_image = {}
    return ReportData(
        title=study_file.name,
        exported_number=chosen.number,
        exported_value=float(chosen.values[0]),
        best_number=best.number,
        best_value=float(best.values[0]),
        trial_count=len(trials),
        completed_count=len(completed),
        failed_count=sum(t.state == TrialState.FAIL for t in trials),
        pruned_count=sum(t.state == TrialState.PRUNED for t in trials),
        stop_reason=str(study.user_attrs.get(records.STOPPED, "")),
        columns=[label for label, _ in columns] + (["reference"] if references else []),
        grid=grid,
        curve=[(t.number, float(t.value)) for t in completed if t.value is not None],
        weights=[(d.name, float(chosen.params[d.name]), d.low, d.high) for d in space.dimensions],
        secret=_secret_weights(study_file, space, plan),
        importances=_importances(study),
        timings=_timing_medians(completed),
        baselines=[(t.label, t.number, float(t.value or 0.0)) for t in baselines],
        validation=[(label, evaluation.value) for label, evaluation in validated],
        confidence=margins_over_baselines(per_image, best=title),
        confidence_source=confidence_source,
        pareto=_pareto_data(study, trials, store, how=how, validated=validated) if several else None,
        guard=_guard_data(study_file, study),
    )


def _guard_data(study_file: StudyFile, study: optuna.Study) -> GuardData | None:
    """The guard's checks of the bests, its bands and verdict, for the proxy-vs-guard chart."""
    if study_file.guard is None:
        return None
    verdict = guard_verdict(read_checks(study), tolerance=study_file.guard.tolerance)
    if not verdict.bests:
        return None
    members = list(verdict.bests[0].scores)
    return GuardData(
        members=members,
        panel=study_file.guard_payloads,
        checks=[(c.trial, c.proxy, tuple(c.scores[m] for m in members)) for c in verdict.bests],
        bands=tuple(verdict.bands.get(m, 0.0) for m in members),
        agreed=verdict.agreed,
        diverged_at=verdict.diverged_at,
        reason=verdict.reason,
    )


def _pareto_data(
    study: optuna.Study,
    trials: list[TrialRecord],
    store: FileSystemArtifactStore,
    *,
    how: str,
    validated: list[tuple[str, Evaluation]],
) -> ParetoData:
    """Every complete trial's scores, whether it is on the front, its first image (the front's: its
    first four) as a thumbnail; each objective's parameter importances."""
    front = {t.number for t in records.front_trials(study)}
    names = records.objective_names(study)
    points = [
        ParetoPoint(
            number=t.number,
            label=t.label,
            values=t.values,
            on_front=t.number in front,
            baseline=t.baseline is not None,
            thumbnails=tuple(
                _thumbnail_uri(store, t.images[key])
                for key in sorted(t.images)[: 4 if t.number in front else 1]
            ),
        )
        for t in trials
        if t.state == TrialState.COMPLETE
    ]
    return ParetoData(
        names=names,
        maximize=records.maximize_flags(study),
        points=points,
        how=how,
        importances={name: _importances(study, objective=index) for index, name in enumerate(names)},
        validation=[(label, tuple(e.objective_scores.values())) for label, e in validated],
    )


THUMBNAIL_PIXELS = 96


def _thumbnail_uri(store: FileSystemArtifactStore, artifact_id: str) -> str | None:
    """The stored image at most ``THUMBNAIL_PIXELS`` wide and high, as a PNG data URI (None when gone):
    the front's scatter shows one per trial, so the report stays small."""
    from PIL import Image

    try:
        with store.open_reader(artifact_id) as reader:
            image = Image.open(io.BytesIO(reader.read()))
            image.load()
    except (ArtifactNotFound, OSError):
        return None
    image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _image_grid(columns: list[TrialRecord], store: FileSystemArtifactStore) -> dict[str, list[GridCell]]:
    """Image key → one (data URI or None, the image's score or None) per column."""
    grid: dict[str, list[GridCell]] = {}
    for column, record in enumerate(columns):
        for key, artifact_id in record.images.items():
            cells = grid.setdefault(key, [(None, None)] * len(columns))
            cells[column] = (_artifact_data_uri(store, artifact_id), record.image_scores.get(key))
    return grid


def _reference_images(study_file: StudyFile, runtime: StudyRuntime | None) -> dict[str, str]:
    """A reference reward's images by key as data URIs: the running study's (a hidden target or a
    checkpoint rendered at start), or the reference folder's PNGs; {} otherwise."""
    images: dict[str, str] = {}
    if runtime is not None and runtime.reference_images:
        for key, image in runtime.reference_images.items():
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            images[key] = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        return images
    reward = study_file.reward
    if (
        isinstance(reward, InlineReward)
        and reward.reference is not None
        and reward.reference.folder is not None
    ):
        for path in sorted(reward.reference.folder.glob("*.png")):
            images[path.stem] = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    return images


SEED_IN_KEY = re.compile(r"-s(\d+)$")


def margins_over_baselines(
    image_scores: dict[str, dict[str, float]], *, best: str, resamples: int = 2000, level: float = 0.9
) -> list[Margin]:
    """(baseline, mean margin, low, high, seeds): the best's score minus each baseline's, averaged per
    seed over the images both have, with a ``level`` bootstrap interval over seeds (resampled with
    replacement, fixed RNG). Fewer than 2 common seeds: no interval (low = high = the margin)."""
    import numpy as np

    def per_seed(scores: dict[str, float]) -> dict[int, list[float]]:
        seeds: dict[int, list[float]] = {}
        for key, value in scores.items():
            match = SEED_IN_KEY.search(key)
            if match:
                seeds.setdefault(int(match.group(1)), []).append(value)
        return seeds

    mine = image_scores.get(best, {})
    margins = []
    for label, scores in image_scores.items():
        if label == best:
            continue
        common = {key: mine[key] - scores[key] for key in mine.keys() & scores.keys()}
        seeds = per_seed(common)
        if not seeds:
            continue
        values = np.array([statistics.fmean(v) for _, v in sorted(seeds.items())])
        mean = float(values.mean())
        if len(values) < 2:
            margins.append((label, mean, mean, mean, len(values)))
            continue
        rng = np.random.default_rng(0)
        draws = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
        low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
        margins.append((label, mean, float(low), float(high), len(values)))
    return margins


def _artifact_data_uri(store: FileSystemArtifactStore, artifact_id: str) -> str | None:
    """The stored PNG as a data URI; None (a gap in the grid, not a failed export) when it is gone."""
    try:
        with store.open_reader(artifact_id) as reader:
            return "data:image/png;base64," + base64.b64encode(reader.read()).decode()
    except (ArtifactNotFound, OSError):
        return None


def _secret_weights(study_file: StudyFile, space: SearchSpace, plan: MergePlan) -> dict[str, float] | None:
    """For hidden-target studies (the demo): the target's value of each searched dimension (the mean
    over the dimension's blocks)."""
    reward = study_file.reward
    if not isinstance(reward, InlineReward) or reward.reference is None or reward.reference.target is None:
        return None
    target = target_params(study_file, plan)
    secret = {d.name: target.lora_strengths[d.lora] for d in space.dimensions if d.lora is not None}
    secret.update(
        {
            d.name: statistics.fmean(target.value(d.param, block) for block in d.blocks)
            for d in space.dimensions
            if d.lora is None and all(target.merges(block) for block in d.blocks)
        }
    )
    return {d.name: secret[d.name] for d in space.dimensions if d.name in secret}


def _importances(study: optuna.Study, *, objective: int | None = None) -> dict[str, float]:
    """Optuna's parameter importances of the value, or of objective ``objective``'s score (as a loss:
    Optuna's evaluator with a target looks for low values, so a maximized score is negated)."""
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 4:
        return {}
    if objective is None:
        target = None
    else:
        sign = -1.0 if study.directions[objective] == optuna.study.StudyDirection.MAXIMIZE else 1.0
        target = lambda trial: sign * trial.values[objective]  # noqa: E731
    try:
        with warnings.catch_warnings():
            if target is not None:  # the evaluator's reminder that a target is minimized: it is
                warnings.simplefilter("ignore", UserWarning)
            return dict(optuna.importance.get_param_importances(study, target=target))
    except (RuntimeError, ValueError):
        return {}


def _timing_medians(trials: list[TrialRecord]) -> dict[str, float]:
    stages: dict[str, list[float]] = {}
    for trial in trials:
        for stage, seconds in trial.timings.items():
            stages.setdefault(stage, []).append(seconds)
    return {stage: statistics.median(values) for stage, values in stages.items()}


def _validation(
    runtime: StudyRuntime | None, space: SearchSpace, rows: list[tuple[str, TrialRecord]]
) -> list[tuple[str, Evaluation]]:
    """Held-out payloads, scored once for each row's trial (needs the live runtime)."""
    if runtime is None or not runtime.validation_jobs:
        return []
    return [
        (label, runtime.evaluate(space.block_params(trial.params), runtime.validation_jobs))
        for label, trial in rows
    ]
