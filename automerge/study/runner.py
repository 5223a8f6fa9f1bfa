"""``automerge optimize``: create or resume the Optuna study, run trials until the budget, the timeout
or early stopping, survive failing trials and Ctrl-C/SIGTERM, then export the best trial (with
several objectives: the Pareto front's knee point).

Per trial (``objective.py``): the sampler proposes → the engine merges in place → render → score →
Optuna is told; per-payload intermediate values let a pruner stop bad trials early. Each trial keeps
its scores, timings and images (as Optuna artifacts, shown by optuna-dashboard).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import FrozenTrial
from rich.console import Console
from rich.markup import escape

from automerge.files import writable_folder
from automerge.study import records
from automerge.study.config import StudyFile, artifact_dir, default_storage, export_dir
from automerge.study.export import export_study
from automerge.study.guard import GuardWatch, agreed_trial
from automerge.study.interruption import Interruption
from automerge.study.objective import Objective, TrialFailed
from automerge.study.progress import TrialProgress
from automerge.study.pruners import make_pruner
from automerge.study.runtime import StudyRuntime, preview_rungs
from automerge.study.samplers import make_multi_objective_sampler, make_sampler
from automerge.study.stopping import BudgetTaken, ConsecutiveFailures, EarlyStopping
from automerge.study.storage import fail_trials_that_never_beat, find_study, open_storage
from automerge.terminal import duration_text, startup_status

MAX_CONSECUTIVE_FAILURES = 5


@dataclass
class RunSummary:
    study_name: str
    ran: int
    completed: int
    best_trial: int | None
    best_value: float | None
    stop_reason: str
    interrupted: bool = False
    export_dir: Path | None = None
    timings: dict[str, list[float]] = field(default_factory=dict)
    front: list[int] = field(default_factory=list)  # several objectives: the Pareto front's trials


def open_study(study: StudyFile) -> optuna.Study:
    """Create or resume the study in its storage; a changed search problem is refused."""
    return _create_or_load(study, find_study(study))[0]


def _create_or_load(study: StudyFile, existing: optuna.Study | None) -> tuple[optuna.Study, bool]:
    """(the study with its sampler and pruner, whether this call created it), given ``existing``
    from ``find_study``. Workers starting at the same instant race to create it; the storage lets
    exactly one win (the study name is unique)."""
    several = study.multi_objective
    options = {
        "study_name": study.name,
        "storage": open_storage(default_storage(study), heartbeat=study.heartbeat),
        "sampler": make_multi_objective_sampler(study.sampler) if several else make_sampler(study.sampler),
        "pruner": make_pruner(study, rungs=preview_rungs(study)),
    }
    directions = (
        {"directions": [s.direction for s in study.scorings]} if several else {"direction": "maximize"}
    )
    created = existing is None
    try:
        result = optuna.create_study(load_if_exists=not created, **directions, **options)
    except optuna.exceptions.DuplicatedStudyError:  # another worker created it meanwhile
        created = False
        result = optuna.load_study(**options)
    result.set_user_attr(records.FINGERPRINT, study.search_fingerprint())
    result.set_user_attr(records.FINGERPRINTS, study.content_fingerprints())
    if several:  # optuna-dashboard's Pareto front and plots name the objectives
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            result.set_metric_names([s.name for s in study.scorings])
    return result, created


def enqueue_baselines(study: optuna.Study, runtime: StudyRuntime) -> None:
    """Pure A, pure B and uniform 0.5 (every dimension at low / high / mid) first, on a new study."""
    for baseline in runtime.space.baselines():
        study.enqueue_trial(baseline.values, user_attrs=records.baseline_attrs(baseline.label))


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=records.BUDGET_STATES))


def run_study(
    study_file: StudyFile,
    *,
    extra_trials: int | None = None,
    timeout: float | None = None,
    console: Console | None = None,
    device: str | None = None,
    export: bool = True,
) -> RunSummary:
    """Run (or resume) a study. ``extra_trials``: run exactly that many more, ignoring the budget and
    early stopping (Optuna's ``n_trials``); else continue to the study's total ``trials``."""
    console = console or Console()
    if study_file.human is not None:  # a person judges the candidates: its own loop (study/human.py)
        from automerge.study.human import run_human_study  # it imports this module

        return run_human_study(
            study_file,
            extra_trials=extra_trials,
            timeout=timeout,
            console=console,
            device=device,
            export=export,
        )
    started = time.monotonic()
    # 1. Storage and resume checks, before any model is loaded; nothing is created yet.
    study = find_study(study_file)
    stopping = _early_stopping(study_file) if extra_trials is None else None
    remaining = _remaining_trials(study, study_file, extra_trials, stopping, console)
    summary = RunSummary(study_file.name, 0, finished_count(study) if study else 0, None, None, "")
    runtime: StudyRuntime | None = None
    try:
        if remaining > 0:
            # 2. The resident runtime (every check of models, space and payloads, then the sources on
            #    the device, the pipeline, the reward).
            with startup_status(console) as status:
                runtime = StudyRuntime(study_file, device=device, status=status)
            # 3. The folders the run writes to, before hours of trials that could not be saved.
            store = FileSystemArtifactStore(
                str(
                    writable_folder(
                        artifact_dir(study_file), fix="check the permissions of the study file's folder"
                    )
                )
            )
            if export:
                writable_folder(export_dir(study_file), fix="set export.dir in the study file")
            # 4. The study: created by exactly one worker, which queues the baselines.
            study, created = _create_or_load(study_file, study)
            study.set_user_attr(records.MERGE_DEVICE, str(runtime.device))
            if created and study_file.baselines:
                enqueue_baselines(study, runtime)
            timeout = timeout if timeout is not None else study_file.timeout_seconds
            _optimize(study, runtime, summary, store, remaining, extra_trials, timeout, stopping, console)
        # 5. Export the best trial so far, or the front's knee point (also after an interruption).
        summary.completed = finished_count(study) if study is not None else 0
        if study is not None and _summarize(summary, study) and export:
            summary.export_dir = export_study(study_file, study=study, runtime=runtime, console=console)
    finally:
        if runtime is not None:
            runtime.close()
    if summary.stop_reason:
        console.print(f"[green]{escape(summary.stop_reason)}[/]")
    if summary.ran:
        elapsed = time.monotonic() - started
        console.print(
            f"ran {summary.ran} trials in {duration_text(elapsed)} "
            f"({duration_text(elapsed / summary.ran)} per trial, start-up and export included)"
        )
    return summary


def _summarize(summary: RunSummary, study: optuna.Study) -> bool:
    """The best trial and its value (with several objectives: the front, and its knee point as the
    trial to export) into ``summary``; False when no trial completed."""
    if records.multi_objective(study):
        summary.front = [t.number for t in records.front_trials(study)]
        if summary.front:
            summary.best_trial = records.pick_trial(study).trial.number
        return bool(summary.front)
    best = records.best_trial(study.get_trials(deepcopy=False))
    if best is not None:
        summary.best_trial, summary.best_value = best.number, best.value
    return best is not None


def _early_stopping(study_file: StudyFile) -> EarlyStopping | None:
    config = study_file.early_stopping
    return None if config is None else EarlyStopping(patience=config.patience, min_delta=config.min_delta)


def _remaining_trials(
    study: optuna.Study | None,
    study_file: StudyFile,
    extra_trials: int | None,
    stopping: EarlyStopping | None,
    console: Console,
) -> int:
    """Trials to run now: ``extra_trials``, else what is left of the budget (0 once stopped early)."""
    if extra_trials is not None:
        return extra_trials
    if study is None:
        return study_file.trials
    decision = stopping.decide(study) if stopping is not None else None
    if decision is not None and decision.stop:
        console.print(f"[yellow]{escape(decision.reason)}[/]; run with --trials N to run N more anyway")
        return 0
    guard = study_file.guard
    disagreement = agreed_trial(study, tolerance=guard.tolerance) if guard is not None else None
    if guard is not None and guard.stop and disagreement is not None:
        console.print(f"[yellow]{escape(disagreement[1])}[/]; run with --trials N to run N more anyway")
        return 0
    remaining = study_file.trials - finished_count(study)
    if remaining <= 0:
        console.print(
            f"the study's budget of {study_file.trials} trials is reached; use --trials N to run more"
        )
    return remaining


def _optimize(
    study: optuna.Study,
    runtime: StudyRuntime,
    summary: RunSummary,
    store: FileSystemArtifactStore,
    remaining: int,
    extra_trials: int | None,
    timeout: float | None,
    stopping: EarlyStopping | None,
    console: Console,
) -> None:
    """Optuna's loop with the progress display and the stopping callbacks; fills ``summary``."""
    several = records.multi_objective(study)
    progress = TrialProgress(
        console,
        total=remaining,
        start_best=_best_value(study),
        objectives=records.objective_names(study) if several else (),
    )
    if several:
        progress.show_front(study)
    failures = ConsecutiveFailures(limit=MAX_CONSECUTIVE_FAILURES)
    heartbeat = runtime.study.heartbeat
    fail_trials_that_never_beat(study, heartbeat)  # a dead worker's trial, before it holds the budget

    def never_beaten(study: optuna.Study, trial: FrozenTrial) -> None:
        fail_trials_that_never_beat(study, heartbeat)

    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] = [never_beaten, progress.callback, failures]
    if extra_trials is None:  # None: run until the budget callback stops the study
        callbacks.append(BudgetTaken(runtime.study.trials))
    if stopping is not None:
        callbacks.append(stopping)
    interruption = Interruption()  # Ctrl-C/SIGTERM: at once in the objective, else after Optuna's write
    budget = runtime.study.trials if extra_trials is None else None
    objective = Objective(
        runtime,
        store=store,
        on_trial=progress.update,
        on_stage=progress.stage,
        budget=budget,
        interruptible=interruption.inside_objective,
    )
    guard = _guard_watch(runtime, objective, console)
    if guard is not None:
        callbacks.append(guard)
    callbacks.append(interruption)
    with interruption.installed(), progress:
        try:
            study.optimize(
                objective,
                n_trials=extra_trials,
                timeout=timeout,
                callbacks=callbacks,
                catch=(TrialFailed,),
                gc_after_trial=False,
            )
        except KeyboardInterrupt:
            summary.interrupted = True
            console.print("[yellow]interrupted: the running trial is marked failed; the study is saved[/]")
        else:
            if interruption.requested:  # deferred: the trial being written finished whole
                summary.interrupted = True
                console.print("[yellow]interrupted after the last trial was saved; the study is saved[/]")
    if guard is not None and not summary.interrupted:
        guard.finish(study)  # the final best, guarded before the export reads the verdict
    summary.ran = progress.ran
    summary.timings = progress.timings
    summary.stop_reason = (
        failures.reason
        or (guard.reason if guard is not None else "")
        or (stopping.reason if stopping is not None else "")
    )


def _guard_watch(runtime: StudyRuntime, objective: Objective, console: Console) -> GuardWatch | None:
    """The guard's callback (``guard:``), warning in the terminal; None without a guard. Its renders
    run between trials: the next trial's sampler time starts after them."""
    config, panel = runtime.study.guard, runtime.guard
    if config is None or panel is None:
        return None

    def score(values: Mapping[str, float]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        try:
            return runtime.guard_scores(values)
        finally:
            objective.restart_sampler_clock()

    return GuardWatch(
        score,
        maximize={member.name: member.direction == "maximize" for member in panel.members},
        every=config.every,
        tolerance=config.tolerance,
        stop=config.stop,
        warn=lambda text: console.print(f"[yellow]{escape(text)}[/]", highlight=False),
    )


def _best_value(study: optuna.Study) -> float | None:
    best = records.best_trial(study.get_trials(deepcopy=False))
    return None if best is None else best.value
