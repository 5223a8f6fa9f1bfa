"""What automerge stores on Optuna trials and studies, and reads back typed: the one owner of the
attribute names.

The objective writes a trial's scores, stage timings and image artifact ids (``write_evaluation``) or
why it failed (``write_failure``); export, report, progress and the benchmarks read them back as a
``TrialRecord``. Best-trial selection is here once (``best_trial``); with several objectives, the
front and the pick of one of its trials (``front_trials``, ``pick_trial``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from automerge.errors import ConfigError, StudyError
from automerge.study import pareto

STAGES = ("sampler", "merge", "render", "score", "bookkeeping")
"""The stages of a trial, in order; ``timings`` holds seconds per stage."""

# Trial attributes (shown as user attributes in optuna-dashboard).
TIMINGS = "timings"
FAIL_REASON = "fail_reason"
IMAGES = "images"
BASELINE = "baseline"
PAYLOAD_SCORES = "payload_scores"
REWARD_SCORES = "reward_scores"
IMAGE_SCORES = "image_scores"
IMAGE_STATS = "image_stats"  # image key → [noise, saturation] (render/checks.py ImageStats)
PROMPT_DISTANCE = "prompt_distance"  # nearest distance of two prompts' images (render/checks.py)
OBJECTIVE_SCORES = "objective_scores"  # several objectives: objective → score
OBJECTIVE_IMAGE_SCORES = "objective_image_scores"  # several objectives: objective → image key → score
PRUNED_AFTER_PAYLOADS = "pruned_after_payloads"
GRID = "grid"  # human studies: the artifact id of the candidate's image grid (the dashboard shows it)

# Study attributes.
FINGERPRINT = "automerge.fingerprint"
FINGERPRINTS = "automerge.fingerprints"  # per part of the search problem, file contents included
MERGE_DEVICE = "automerge.merge_device"
STOPPED = "automerge.stopped"
HUMAN = "automerge.human"  # a person judges the candidates: "compare" or "rate" (study/human.py)

INTERRUPTED = "interrupted"
"""The fail reason of a trial stopped by Ctrl-C or SIGTERM."""

OVER_BUDGET = "not run: other workers had already started the study's last trials"
"""The fail reason of a trial asked for by a worker after the budget was taken (a race)."""

BUDGET_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
"""Trials that count toward a study's ``trials`` budget."""

TAKEN_STATES = (*BUDGET_STATES, TrialState.RUNNING, TrialState.WAITING)
"""Trials that hold a place in the budget: counted, running or queued."""

_DIGITS = 6  # stored scores and timings are rounded to this many decimals


@dataclass(frozen=True)
class TrialRecord:
    """One trial as automerge reads it back."""

    number: int
    state: TrialState
    value: float | None
    params: Mapping[str, float]  # Optuna's values by dimension name ("alpha.IN04")
    baseline: str | None = None  # "A", "B", "uniform 0.5", ... for the enqueued baselines
    timings: Mapping[str, float] = field(default_factory=dict)  # seconds per stage
    images: Mapping[str, str] = field(default_factory=dict)  # image key → artifact id
    payload_scores: tuple[float, ...] = ()
    reward_scores: Mapping[str, float] = field(default_factory=dict)  # mean raw score per reward
    image_scores: Mapping[str, float] = field(default_factory=dict)  # image key → its score
    fail_reason: str | None = None
    values: tuple[float, ...] = ()  # a complete trial's value, or each objective's score
    objective_scores: Mapping[str, float] = field(default_factory=dict)  # several objectives: name → score

    @classmethod
    def of(cls, trial: FrozenTrial) -> TrialRecord:
        attrs = trial.user_attrs
        values = tuple(trial.values or ()) if trial.state == TrialState.COMPLETE else ()
        return cls(
            number=trial.number,
            state=trial.state,
            value=values[0] if len(values) == 1 else None,
            params=MappingProxyType(dict(trial.params)),
            baseline=attrs.get(BASELINE),
            timings=MappingProxyType({k: float(v) for k, v in attrs.get(TIMINGS, {}).items()}),
            images=MappingProxyType(dict(attrs.get(IMAGES, {}))),
            payload_scores=tuple(float(v) for v in attrs.get(PAYLOAD_SCORES, ())),
            reward_scores=MappingProxyType({k: float(v) for k, v in attrs.get(REWARD_SCORES, {}).items()}),
            image_scores=MappingProxyType({k: float(v) for k, v in attrs.get(IMAGE_SCORES, {}).items()}),
            fail_reason=attrs.get(FAIL_REASON),
            values=values,
            objective_scores=MappingProxyType(
                {k: float(v) for k, v in attrs.get(OBJECTIVE_SCORES, {}).items()}
            ),
        )

    @property
    def label(self) -> str:
        """The baseline's name ("A", "uniform 0.5"), else ``trial N``."""
        return self.baseline or f"trial {self.number}"


def records(study: optuna.Study, *, states: Iterable[TrialState] | None = None) -> list[TrialRecord]:
    """The study's trials (optionally of some states) as records, by number."""
    wanted = tuple(states) if states is not None else None
    return [TrialRecord.of(t) for t in study.get_trials(deepcopy=False, states=wanted)]


def best_trial(trials: Iterable[FrozenTrial]) -> FrozenTrial | None:
    """The completed trial with the highest value, the earliest on ties; None when none completed
    (and in a study with several objectives, which has a front instead: ``front_trials``)."""
    completed = [t for t in trials if t.state == TrialState.COMPLETE and len(t.values or ()) == 1]
    return max(completed, key=lambda t: (t.value, -t.number)) if completed else None


def preferred_trial(study: optuna.Study) -> FrozenTrial | None:
    """A compare study's best: among the candidates the person never chose as worse (and did not
    skip; optuna-dashboard's ``PreferentialStudy.best_trials``), the one preferred over the most
    others, the lowest number on ties (judged the longest); None before the first choice."""
    from optuna_dashboard.preferential import PreferentialStudy

    preferential = PreferentialStudy(study)
    wins: dict[int, int] = {}
    for better, _ in preferential.get_preferences(deepcopy=False):
        wins[better.number] = wins.get(better.number, 0) + 1
    best = preferential.best_trials
    return min(best, key=lambda t: (-wins.get(t.number, 0), t.number)) if best else None


def multi_objective(study: optuna.Study) -> bool:
    """Whether the study has several objectives (a Pareto front, no best trial)."""
    return len(study.directions) > 1


def objective_names(study: optuna.Study) -> list[str]:
    """The objectives' names as the study stores them (``set_metric_names``), else objective 1, 2, …"""
    return list(study.metric_names or [f"objective {i + 1}" for i in range(len(study.directions))])


def maximize_flags(study: optuna.Study) -> list[bool]:
    return [direction == StudyDirection.MAXIMIZE for direction in study.directions]


def front_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The completed trials no other completed trial dominates, by number."""
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        return []
    points = pareto.maximized(np.array([t.values for t in completed]), maximize_flags(study))
    return [t for t, on in zip(completed, pareto.front_mask(points), strict=True) if on]


@dataclass(frozen=True)
class Picked:
    """The trial a pick rule chose on the front, and one line that says why."""

    trial: FrozenTrial
    reason: str


def pick_trial(study: optuna.Study, rule: pareto.PickRule = pareto.KNEE) -> Picked:
    """The front trial ``rule`` picks (objectives normalised by the front's range), and why."""
    front = front_trials(study)
    if not front:
        raise StudyError(f"study '{study.study_name}' has no completed trial to export yet")
    names = objective_names(study)
    if rule.weights and len(rule.weights) != len(names):
        raise ConfigError(
            f"--pick {rule.text}: {len(rule.weights)} weight(s) for the {len(names)} objectives "
            f"{', '.join(names)}; give one weight per objective, in that order"
        )
    points = pareto.maximized(np.array([t.values for t in front]), maximize_flags(study))
    row, why = pareto.pick(points, rule)
    trial = front[row]
    scores = ", ".join(f"{name} {value:.6g}" for name, value in zip(names, trial.values, strict=True))
    return Picked(
        trial,
        f"picked trial {trial.number} ({scores}) of the {len(front)} on the Pareto front "
        f"(--pick {rule.text}): {why}, each objective normalised by the front's range",
    )


def baseline_attrs(label: str) -> dict[str, str]:
    """The attributes of an enqueued baseline trial."""
    return {BASELINE: label}


def write_evaluation(
    trial: optuna.Trial,
    *,
    payload_scores: Iterable[float],
    reward_scores: Mapping[str, float],
    images: Mapping[str, str],
    image_scores: Mapping[str, float] | None = None,
    image_stats: Mapping[str, list[float]] | None = None,
    objective_scores: Mapping[str, float] | None = None,
    objective_image_scores: Mapping[str, Mapping[str, float]] | None = None,
    prompt_distance: float | None = None,
) -> None:
    """A completed evaluation's scores, each image's score (full precision: MSE-type scores are tiny),
    image artifact ids, each image's statistics (noise, saturation) and the nearest distance of two
    prompts' images (when two prompts share a seed); with several objectives, each objective's score
    and image scores (full precision) too."""
    trial.set_user_attr(PAYLOAD_SCORES, [round(v, _DIGITS) for v in payload_scores])
    trial.set_user_attr(REWARD_SCORES, {k: round(v, _DIGITS) for k, v in reward_scores.items()})
    trial.set_user_attr(IMAGE_SCORES, dict(image_scores or {}))
    trial.set_user_attr(IMAGES, dict(images))
    if image_stats is not None:
        trial.set_user_attr(
            IMAGE_STATS, {k: [round(v, _DIGITS) for v in values] for k, values in image_stats.items()}
        )
    if prompt_distance is not None:
        trial.set_user_attr(PROMPT_DISTANCE, prompt_distance)
    if objective_scores:
        trial.set_user_attr(OBJECTIVE_SCORES, dict(objective_scores))
        trial.set_user_attr(
            OBJECTIVE_IMAGE_SCORES, {k: dict(v) for k, v in (objective_image_scores or {}).items()}
        )


def baseline_image_stats(study: optuna.Study) -> list[dict[str, list[float]]]:
    """Each completed baseline trial's image statistics (``IMAGE_STATS``), the range a trial's images
    are checked against."""
    return [
        dict(trial.user_attrs[IMAGE_STATS])
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if trial.user_attrs.get(BASELINE) and IMAGE_STATS in trial.user_attrs
    ]


def baseline_prompt_distances(study: optuna.Study) -> list[float]:
    """Each completed baseline trial's nearest distance of two prompts' images (``PROMPT_DISTANCE``),
    which calibrates the near-duplicate check."""
    return [
        float(trial.user_attrs[PROMPT_DISTANCE])
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if trial.user_attrs.get(BASELINE) and PROMPT_DISTANCE in trial.user_attrs
    ]


def write_timings(trial: optuna.Trial, timings: Mapping[str, float]) -> None:
    trial.set_user_attr(TIMINGS, {k: round(v, _DIGITS) for k, v in timings.items()})


def write_failure(trial: optuna.Trial, reason: str) -> None:
    """Why the trial failed (truncated to 2000 characters), or ``INTERRUPTED``."""
    trial.set_user_attr(FAIL_REASON, reason[:2000])


def write_pruned(trial: optuna.Trial) -> None:
    trial.set_user_attr(PRUNED_AFTER_PAYLOADS, True)


def choose_trial(
    study: optuna.Study, number: int | None, *, pick: pareto.PickRule | None = None
) -> FrozenTrial:
    """Trial ``number`` (it must be complete), or the best when ``number`` is None; with several
    objectives, the front trial ``pick`` chooses (default: the knee point)."""
    several = multi_objective(study)
    if pick is not None and number is not None:
        raise ConfigError(f"--trial {number} and --pick {pick.text}: give one of them")
    if pick is not None and not several:
        raise ConfigError(
            f"--pick {pick.text}: study '{study.study_name}' has one score, so its best trial is exported; "
            "--pick chooses on the Pareto front of a study with several objectives (use --trial N)"
        )
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = pick_trial(study, pick or pareto.KNEE).trial if several and completed else best_trial(completed)
    if study.user_attrs.get(HUMAN) == "compare":  # every judged candidate's value is 0: the choices rank
        best = preferred_trial(study)
    if best is None:
        raise StudyError(f"study '{study.study_name}' has no completed trial to export yet")
    if number is None:
        return best
    for trial in completed:
        if trial.number == number:
            return trial
    shown = ", ".join(str(t.number) for t in completed[:20])
    more = f" and {len(completed) - 20} more" if len(completed) > 20 else ""
    which = (
        f"front: {', '.join(str(t.number) for t in front_trials(study))}"
        if several
        else f"best: {best.number}"
    )
    raise StudyError(
        f"study '{study.study_name}': trial {number} is not a completed trial; "
        f"completed: {shown}{more} ({which})"
    )
