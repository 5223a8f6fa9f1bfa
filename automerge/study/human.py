"""Human preference in the loop: ``reward: {human: {mode: compare | rate}}``. A person judges each
candidate's image grid (every payload image, tiled) in optuna-dashboard; the study proposes the next
candidates from those judgements.

- ``compare``: a preferential study (optuna-dashboard's ``PreferentialGPSampler``; Takeno et al. 2023,
  "Towards practical preferential Bayesian optimization with skew Gaussian processes"). The dashboard
  shows the waiting grids side by side and the person clicks the worst; each click stores "every other
  grid shown beats it", and the sampler's next proposal follows from all the choices so far.
- ``rate``: a single-objective study whose trials stay RUNNING until the person scores them with the
  dashboard's slider (or labelled buttons); the dashboard tells the trial its score.

The worker renders ahead: it keeps ``candidates`` grids waiting for the person (compare: the
preferential study's ``n_generate``) and otherwise polls the storage for the answers, so a person never
waits for a render that could have run earlier. The budget (``trials``) counts candidates generated; a
run ends when all are generated and judged (or skipped), at ``timeout``, or on Ctrl-C, which fails only
a candidate still rendering: waiting grids keep waiting, and a resumed run (same storage, same name)
continues with them and with every recorded choice.
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.trial import FrozenTrial, TrialState
from PIL import Image
from rich.console import Console
from rich.markup import escape

from automerge.errors import AutomergeError, StudyError
from automerge.files import writable_folder
from automerge.study import records
from automerge.study.config import HumanReward, StudyFile, artifact_dir, default_storage, export_dir
from automerge.study.export import export_study
from automerge.study.interruption import Interruption
from automerge.study.runner import MAX_CONSECUTIVE_FAILURES, RunSummary, enqueue_baselines
from automerge.study.runtime import StudyRuntime
from automerge.study.storage import find_study, open_storage
from automerge.terminal import duration_text, startup_status

POLL_SECONDS = 1.0
"""Seconds between two reads of the storage while the worker waits for the person."""

GRID_GAP = 4  # pixels between two images of a grid
GRID_BACKGROUND = (32, 32, 32)


def tile_grid(images: Sequence[Image.Image], *, columns: int | None = None) -> Image.Image:
    """The images in rows of ``columns`` (default ⌈√n⌉) on a dark background, each in a cell the size
    of the largest, ``GRID_GAP`` pixels apart, in order (row by row)."""
    if not images:
        raise ValueError("a grid needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = max(i.width for i in images), max(i.height for i in images)
    grid = Image.new(
        "RGB",
        (columns * width + (columns - 1) * GRID_GAP, rows * height + (rows - 1) * GRID_GAP),
        GRID_BACKGROUND,
    )
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid.paste(image.convert("RGB"), (column * (width + GRID_GAP), row * (height + GRID_GAP)))
    return grid


@dataclass(frozen=True)
class HumanStudy:
    """A stored human study and how the person's answers are read back from it."""

    study: optuna.Study
    human: HumanReward

    def candidates(self) -> list[FrozenTrial]:
        """Every candidate rendered whole (its grid stored), judged or not, by number."""
        states = (TrialState.RUNNING, TrialState.COMPLETE)
        return [
            t for t in self.study.get_trials(deepcopy=False, states=states) if records.GRID in t.user_attrs
        ]

    def waiting(self) -> list[FrozenTrial]:
        """Candidates still waiting for the person: not compared or rated yet, and not skipped."""
        skipped = _skipped_trial_ids(self.study)
        return [t for t in self.candidates() if t.state == TrialState.RUNNING and t._trial_id not in skipped]

    def wants_candidate(self) -> bool:
        """compare: optuna-dashboard's ``should_generate`` (fewer than ``candidates`` grids neither
        chosen as worse nor skipped), once the last choice is written whole (the dashboard stores the
        choice, then completes its trials one by one; the sampler's search space counts complete trials
        only, so a proposal made in between would ignore every choice); rate: fewer than ``candidates``
        grids waiting for a score."""
        if self.human.mode == "compare":
            from optuna_dashboard.preferential import PreferentialStudy

            preferential = PreferentialStudy(self.study)
            choices = preferential.get_preferences(deepcopy=False)
            if any(trial.state != TrialState.COMPLETE for pair in choices for trial in pair):
                return False
            return preferential.should_generate()
        return len(self.waiting()) < self.human.candidates

    def best(self) -> FrozenTrial | None:
        """compare: the candidate the choices rank highest (``records.preferred_trial``); rate: the
        highest score."""
        if self.human.mode == "compare":
            return records.preferred_trial(self.study)
        return records.best_trial(self.study.get_trials(deepcopy=False))


def _skipped_trial_ids(study: optuna.Study) -> set[int]:
    """Trials the person skipped in optuna-dashboard's preferential view (stored as study attributes)."""
    from optuna_dashboard.preferential._system_attrs import get_skipped_trial_ids

    return set(get_skipped_trial_ids(study._storage.get_study_system_attrs(study._study_id)))


def open_human_study(study_file: StudyFile, existing: optuna.Study | None) -> tuple[HumanStudy, bool]:
    """Create or resume the study (its storage without heartbeats: candidates wait for the person as
    RUNNING trials), and tell optuna-dashboard what the person sees; (the study, whether created)."""
    human = study_file.human
    assert human is not None
    storage = open_storage(default_storage(study_file))
    if human.mode == "compare":
        study = _open_compare(study_file, storage, human)
    else:
        study = optuna.create_study(
            study_name=study_file.name,
            storage=storage,
            sampler=_rate_sampler(study_file),
            direction="maximize",
            load_if_exists=True,
        )
        _register_rating_form(study, human)
    study.set_user_attr(records.FINGERPRINT, study_file.search_fingerprint())
    study.set_user_attr(records.FINGERPRINTS, study_file.content_fingerprints())
    study.set_user_attr(records.HUMAN, human.mode)
    return HumanStudy(study, human), existing is None


def _open_compare(
    study_file: StudyFile, storage: optuna.storages.BaseStorage, human: HumanReward
) -> optuna.Study:
    """The preferential study, its sampler seeded from ``sampler.seed``; the dashboard shows each
    candidate's ``records.GRID`` artifact."""
    from optuna_dashboard import register_preference_feedback_component
    from optuna_dashboard.preferential import PreferentialStudy, create_study

    try:
        from optuna_dashboard.preferential.samplers.gp import PreferentialGPSampler
    except ImportError:
        raise StudyError(
            f"{study_file.path}: reward.human.mode: compare needs botorch (optuna-dashboard's "
            "PreferentialGPSampler); install it: pip install 'automerge[human]'"
        ) from None
    sampler = PreferentialGPSampler(seed=study_file.sampler.seed)
    try:
        create_study(
            n_generate=human.candidates,
            storage=storage,
            sampler=sampler,
            study_name=study_file.name,
            load_if_exists=True,
        )
        study = optuna.load_study(study_name=study_file.name, storage=storage, sampler=sampler)
    except ValueError as error:  # "The study is not a PreferentialStudy."
        raise StudyError(
            f"{study_file.path}: study '{study_file.name}': {error}; give it a new name"
        ) from None
    register_preference_feedback_component(PreferentialStudy(study), "artifact", records.GRID)
    return study


def _rate_sampler(study_file: StudyFile) -> optuna.samplers.BaseSampler:
    from automerge.study.samplers import make_sampler

    return make_sampler(study_file.sampler)


def _register_rating_form(study: optuna.Study, human: HumanReward) -> None:
    """The dashboard's rating widget: the slider from ``low`` to ``high``, or the ``choices`` buttons."""
    from optuna_dashboard import ObjectiveChoiceWidget, ObjectiveSliderWidget, register_objective_form_widgets

    description = "How good is this grid? (higher is better)"
    widget: ObjectiveChoiceWidget | ObjectiveSliderWidget
    if human.choices is not None:
        widget = ObjectiveChoiceWidget(
            choices=list(human.choices), values=list(human.choices.values()), description=description
        )
    else:
        widget = ObjectiveSliderWidget(
            min=human.low, max=human.high, step=human.step, description=description
        )
    register_objective_form_widgets(study, [widget])


def queues_baselines(study: StudyFile) -> bool:
    """rate: ``baselines`` (pure A, pure B, uniform 0.5 first); compare: only when ``baselines: true``
    is written. The three lie on one diagonal of the space, and the preferential GP, fitted on choices
    among them, kept proposing on that diagonal (tests/study/test_human.py's tiny study: best pixel MSE
    5.8 with them, 0.4–0.6 with two random first candidates instead)."""
    human = study.human
    assert human is not None
    return study.baselines and (human.mode == "rate" or "baselines" in study.model_fields_set)


def _fail_unfinished(study: optuna.Study) -> list[int]:
    """RUNNING trials without a grid: a worker stopped while rendering them (one worker per human
    study); failed as interrupted so they neither hold the budget nor show an empty grid."""
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if records.GRID not in trial.user_attrs:
            study._storage.set_trial_user_attr(trial._trial_id, records.FAIL_REASON, records.INTERRUPTED)
            study.tell(trial.number, state=TrialState.FAIL)
            failed.append(trial.number)
    return failed


class CandidateLoop:
    """Renders candidates ahead and waits for the person's judgements in the storage."""

    def __init__(
        self,
        human: HumanStudy,
        runtime: StudyRuntime | None,
        store: FileSystemArtifactStore | None,
        *,
        to_generate: int,
        console: Console,
        poll: float = POLL_SECONDS,
    ) -> None:
        self.human = human
        self.runtime = runtime
        self.store = store
        self.to_generate = to_generate  # candidates this run renders (the rest of the budget)
        self.console = console
        self.poll = poll
        self.generated = 0
        self.failures = 0
        self.stop_reason = ""

    def run(self, interruption: Interruption, *, deadline: float | None) -> None:
        """Until every candidate is generated and judged, the deadline, five failures in a row or a signal."""
        told_to_wait = False
        while not interruption.requested:
            if deadline is not None and time.monotonic() >= deadline:
                self.stop_reason = "stopped: timeout reached"
                return
            if self.generated < self.to_generate and self.human.wants_candidate():
                self._generate(interruption)
                told_to_wait = False
                if self.failures >= MAX_CONSECUTIVE_FAILURES:
                    self.stop_reason = f"stopped: {self.failures} candidates in a row failed"
                    return
                continue
            if self.generated >= self.to_generate and not self.human.waiting():
                return
            if not told_to_wait:
                self.console.print(self._waiting_line(), highlight=False)
                told_to_wait = True
            time.sleep(self.poll)

    def _waiting_line(self) -> str:
        waiting = len(self.human.waiting())
        what = (
            "the worst of the grids shown" if self.human.human.mode == "compare" else "a score for each grid"
        )
        return f"waiting for the person: {waiting} grid(s) in optuna-dashboard, pick {what}"

    def _generate(self, interruption: Interruption) -> None:
        """One candidate: ask (a queued baseline first) → suggest → merge in place → render → grid →
        stored as the trial's artifacts; the trial stays RUNNING for the person. A failure fails the
        trial with its reason; a signal while rendering fails it as interrupted and stops."""
        assert self.runtime is not None and self.store is not None
        study = self.human.study
        started = time.perf_counter()
        with warnings.catch_warnings():  # the preferential GP's "dynamic search space" before any choice
            warnings.simplefilter("ignore", UserWarning)
            trial = study.ask()
        try:
            with interruption.inside_objective(), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                values = self.runtime.space.suggest(trial)
                proposed = time.perf_counter()
                images = self.runtime.render_images(
                    self.runtime.space.block_params(values), self.runtime.jobs
                )
                rendered = time.perf_counter()
                ids, grid_id = self._upload(trial, [(job.key, images[job.key]) for job in self.runtime.jobs])
        except KeyboardInterrupt:
            records.write_failure(trial, records.INTERRUPTED)
            study.tell(trial, state=TrialState.FAIL)
            raise
        except (AutomergeError, RuntimeError, ValueError) as error:  # a broken merge or render: go on
            records.write_failure(trial, f"{type(error).__name__}: {error}")
            study.tell(trial, state=TrialState.FAIL)
            self.failures += 1
            self.console.print(
                f"[red]candidate {trial.number} failed[/]: {escape(str(error))}", highlight=False
            )
            return
        trial.set_user_attr(records.IMAGES, ids)
        records.write_timings(
            trial,
            {
                "sampler": proposed - started,
                "render": rendered - proposed,
                "bookkeeping": time.perf_counter() - rendered,
            },
        )
        trial.set_user_attr(records.GRID, grid_id)  # last: the candidate is ready for the person
        self.failures = 0
        self.generated += 1
        label = trial.user_attrs.get(records.BASELINE)
        self.console.print(
            f"candidate {self.generated}/{self.to_generate}: trial {trial.number}"
            f"{f' ({label})' if label else ''} rendered in {duration_text(time.perf_counter() - started)}",
            highlight=False,
        )

    def _upload(
        self, trial: optuna.Trial, images: list[tuple[str, Image.Image]]
    ) -> tuple[dict[str, str], str]:
        """Each image and their grid as the trial's artifacts: (image key → id, the grid's id)."""
        assert self.store is not None
        ids = {}
        with tempfile.TemporaryDirectory() as folder:
            for key, image in [*images, ("grid", tile_grid([image for _, image in images]))]:
                path = Path(folder) / f"{key}.png"
                image.save(path, format="PNG", compress_level=1)
                ids[key] = upload_artifact(
                    artifact_store=self.store, file_path=str(path), study_or_trial=trial, mimetype="image/png"
                )
        grid_id = ids.pop("grid")
        return ids, grid_id


def run_human_study(
    study_file: StudyFile,
    *,
    extra_trials: int | None = None,
    timeout: float | None = None,
    console: Console | None = None,
    device: str | None = None,
    export: bool = True,
    poll: float = POLL_SECONDS,
) -> RunSummary:
    """Run (or resume) a human study: ``extra_trials`` more candidates, else up to ``trials``; then
    export the best (compare: the candidate the person's choices rank highest)."""
    console = console or Console()
    started = time.monotonic()
    reward = study_file.human
    assert reward is not None
    # 1. Storage and resume checks (a changed mode is a changed search problem), before any model is
    #    loaded; nothing is created yet.
    existing = find_study(study_file)
    done = len(HumanStudy(existing, reward).candidates()) if existing is not None else 0
    to_generate = extra_trials if extra_trials is not None else max(study_file.trials - done, 0)
    summary = RunSummary(study_file.name, 0, done, None, None, "")
    runtime: StudyRuntime | None = None
    try:
        # 2. The resident runtime, only when there are candidates to render.
        store = None
        if to_generate > 0:
            with startup_status(console) as status:
                runtime = StudyRuntime(study_file, device=device, status=status)
            fix = "check the permissions of the study file's folder"
            store = FileSystemArtifactStore(str(writable_folder(artifact_dir(study_file), fix=fix)))
        if export:
            writable_folder(export_dir(study_file), fix="set export.dir in the study file")
        # 3. The study: created once (the baselines queued), unfinished renders of a stopped run failed.
        human, created = open_human_study(study_file, existing)
        if created and queues_baselines(study_file) and runtime is not None:
            enqueue_baselines(human.study, runtime)
        _fail_unfinished(human.study)
        if to_generate == 0 and not human.waiting():
            console.print(
                f"the study's budget of {study_file.trials} candidates is reached; use --trials N for more"
            )
        # 4. Render ahead, wait for the person.
        loop = CandidateLoop(human, runtime, store, to_generate=to_generate, console=console, poll=poll)
        timeout = timeout if timeout is not None else study_file.timeout_seconds
        interruption = Interruption()
        with interruption.installed():
            try:
                loop.run(interruption, deadline=None if timeout is None else started + timeout)
            except KeyboardInterrupt:  # while rendering: that candidate is failed as interrupted
                summary.interrupted = True
        summary.interrupted = summary.interrupted or interruption.requested
        if summary.interrupted:
            console.print(
                "[yellow]interrupted: waiting grids stay in the study for the person; it is saved[/]"
            )
        summary.ran, summary.stop_reason = loop.generated, loop.stop_reason
        # 5. Export the best so far (also after an interruption).
        summary.completed = len(human.candidates())
        best = human.best()
        if best is not None:
            summary.best_trial, summary.best_value = best.number, best.value
            if reward.mode == "compare":
                summary.best_value = None
                console.print(_pick_line(human.study, best), highlight=False)
            if export:
                summary.export_dir = export_study(
                    study_file, study=human.study, runtime=runtime, console=console
                )
        else:
            console.print("nothing to export yet: the person has not judged any candidate")
    finally:
        if runtime is not None:
            runtime.close()
    if summary.stop_reason:
        console.print(f"[green]{escape(summary.stop_reason)}[/]")
    return summary


def _pick_line(study: optuna.Study, best: FrozenTrial) -> str:
    """Which candidate the choices rank highest, and why."""
    from optuna_dashboard.preferential import PreferentialStudy

    preferential = PreferentialStudy(study)
    choices = preferential.get_preferences(deepcopy=False)
    wins = sum(1 for better, _ in choices if better.number == best.number)
    unbeaten = len(preferential.best_trials)
    return (
        f"picked trial {best.number}: of the {unbeaten} candidate(s) never chosen as worse, the one preferred "
        f"over the most others ({wins} of {len(choices)} recorded preferences; ties: the lowest number)"
    )
