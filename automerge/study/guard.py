"""The guard against reward hacking: a held-out panel (other reward models and/or the validation
payloads) scores the best trial as it changes. When the proxy (the study's reward) improves while a
guard member gets worse than its best agreed score by more than its own noise, the run warns, the
report marks the trial, and with ``guard: {stop: true}`` the study ends there and exports the last best
the guard agreed with.

Stateless like early stopping: each check is one study attribute (``automerge.guard.NNNNNN``: the
trial, its proxy value, each member's panel score and image scores), written by whichever worker made
it; the verdict is computed from them (``guard_verdict``), so it survives resume and is the same for
every worker and for ``automerge export``.

Noise: a member's panel score is a mean over images at fixed seeds, so it moves with the seeds' luck.
Its standard error is estimated from the baselines' checks (the first check's without baselines): the
pooled variance of image scores around each prompt's mean over its seeds, s², gives
SE = √(s² / n) for a panel of n images (with one seed per prompt, the spread over all of the check's
images stands in). A drop counts when it exceeds ``tolerance`` × SE (default 2).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import optuna
from optuna.trial import FrozenTrial, TrialState

from automerge.errors import AutomergeError
from automerge.study import records

log = logging.getLogger("automerge.study")

CHECK_PREFIX = "automerge.guard."
"""Study attribute of one guard check: ``automerge.guard.000042`` for trial 42."""

_SEED = re.compile(r"-s\d+$")  # a study image key's seed part: p0-i03-s0002 → p0-i03


@dataclass(frozen=True)
class GuardCheck:
    """The guard's scores of one trial: each member's panel score (as the reward gives it) and image
    scores, whether the member is maximized, and the trial's proxy value."""

    trial: int
    proxy: float
    scores: Mapping[str, float]
    image_scores: Mapping[str, Mapping[str, float]]
    maximize: Mapping[str, bool]
    baseline: bool = False

    def gain(self, member: str) -> float:
        """The member's score in the maximize sense."""
        score = self.scores[member]
        return score if self.maximize[member] else -score

    def as_attr(self) -> dict[str, object]:
        return {
            "trial": self.trial,
            "proxy": self.proxy,
            "scores": dict(self.scores),
            "image_scores": {m: dict(s) for m, s in self.image_scores.items()},
            "maximize": dict(self.maximize),
            "baseline": self.baseline,
        }

    @classmethod
    def of(cls, attr: Mapping[str, object]) -> GuardCheck:
        return cls(
            trial=int(attr["trial"]),  # type: ignore[arg-type]
            proxy=float(attr["proxy"]),  # type: ignore[arg-type]
            scores={m: float(v) for m, v in dict(attr["scores"]).items()},  # type: ignore[call-overload]
            image_scores={m: dict(s) for m, s in dict(attr["image_scores"]).items()},  # type: ignore[call-overload]
            maximize={m: bool(v) for m, v in dict(attr["maximize"]).items()},  # type: ignore[call-overload]
            baseline=bool(attr.get("baseline", False)),
        )


def check_attr(trial: int) -> str:
    return f"{CHECK_PREFIX}{trial:06d}"


def read_checks(study: optuna.Study) -> list[GuardCheck]:
    """The study's guard checks, by trial number."""
    attrs = study.user_attrs
    return sorted(
        (GuardCheck.of(value) for key, value in attrs.items() if key.startswith(CHECK_PREFIX)),
        key=lambda check: check.trial,
    )


def standard_error(image_scores: Mapping[str, float]) -> float:
    """SE of the mean of ``image_scores`` (key → score) from the seed spread: √(s² / n), s² the pooled
    variance around each prompt's mean over its seeds (keys without their ``-sNNNN``); with one seed
    per prompt, the variance of all the scores. 0 for a single image."""
    groups: dict[str, list[float]] = {}
    for key, score in image_scores.items():
        groups.setdefault(_SEED.sub("", key), []).append(float(score))
    spread = [values for values in groups.values() if len(values) > 1]
    if not spread:
        spread = [[float(s) for s in image_scores.values()]]
    squares = sum(sum((v - sum(vs) / len(vs)) ** 2 for v in vs) for vs in spread)
    degrees = sum(len(vs) - 1 for vs in spread)
    if degrees == 0:
        return 0.0
    return math.sqrt(squares / degrees / len(image_scores))


def guard_noise(checks: Sequence[GuardCheck]) -> dict[str, float]:
    """Each member's standard error (``standard_error``), from the baselines' checks (the mean of
    their variances), else from the first check; {} before any check."""
    calibration = [check for check in checks if check.baseline] or list(checks[:1])
    if not calibration:
        return {}
    members = calibration[0].scores.keys()
    return {
        member: math.sqrt(
            sum(standard_error(check.image_scores[member]) ** 2 for check in calibration) / len(calibration)
        )
        for member in members
    }


@dataclass(frozen=True)
class GuardVerdict:
    """The guard's reading of the bests so far: ``agreed`` the last best it agreed with,
    ``diverged_at`` the first best of the current disagreement (None: it agrees with the best), and
    why in one line."""

    bests: list[GuardCheck]  # the checks of trials that were a new best, in order
    noise: dict[str, float]  # member → standard error
    bands: dict[str, float]  # member → the drop that counts (tolerance × noise)
    peaks: dict[int, dict[str, float]] = field(default_factory=dict)  # trial → members' peak before it
    agreed: int | None = None
    diverged_at: int | None = None
    reason: str = ""


def guard_verdict(checks: Sequence[GuardCheck], *, tolerance: float = 2.0) -> GuardVerdict:
    """Walk the bests (checks whose proxy beats every earlier check's) in trial order: a best agrees
    when no member's score (maximize sense) fell below that member's peak over the agreed bests by more
    than ``tolerance`` × its noise; the first best is agreed. A later agreed best ends a disagreement."""
    noise = guard_noise(checks)
    bands = {member: tolerance * se for member, se in noise.items()}
    bests, peaks = [], {}
    peak: dict[str, float] = {}
    proxy = -math.inf
    agreed = diverged_at = None
    reason = ""
    for check in checks:
        if check.proxy <= proxy:
            continue
        proxy = check.proxy
        bests.append(check)
        peaks[check.trial] = dict(peak)
        worse = [m for m in check.scores if m in peak and check.gain(m) < peak[m] - bands.get(m, 0.0)]
        if not worse:
            agreed, diverged_at, reason = check.trial, None, ""
            for member in check.scores:
                peak[member] = max(peak.get(member, -math.inf), check.gain(member))
            continue
        if diverged_at is None:
            diverged_at = check.trial
            member = worse[0]
            best_score = peak[member] if check.maximize[member] else -peak[member]
            reason = (
                f"guard: from trial {check.trial} on the proxy improves (score {check.proxy:.6g}) while "
                f"guard {member} gets worse ({check.scores[member]:.6g} against {best_score:.6g} at its "
                f"best, more than its noise ±{bands[member]:.3g}); the last best it agreed with is "
                f"trial {agreed}"
            )
    return GuardVerdict(bests, noise, bands, peaks, agreed, diverged_at, reason)


class GuardFailed(AutomergeError):
    """The guard could not score a trial (its render or reward failed); the study goes on."""


ScoreTrial = Callable[[Mapping[str, float]], tuple[dict[str, float], dict[str, dict[str, float]]]]
"""Renders the panel with a trial's parameters and scores it: (member → score, member → key → score)."""


class GuardWatch:
    """Optuna callback: guards the baselines (the noise) and the best trial, at most once every
    ``every`` completed trials; warns at the start of a disagreement and, with ``stop``, stops the
    study (``records.STOPPED`` says why)."""

    def __init__(
        self,
        score: ScoreTrial,
        *,
        maximize: Mapping[str, bool],
        every: int = 1,
        tolerance: float = 2.0,
        stop: bool = False,
        warn: Callable[[str], None] = log.warning,
    ) -> None:
        self.score = score
        self.maximize = dict(maximize)
        self.every = every
        self.tolerance = tolerance
        self.stop = stop
        self.warn = warn
        self.since_check = every  # the first best is guarded at once
        self.warned: int | None = None
        self.judged: set[str] = set()  # the checks the last verdict read
        self.reason = ""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state != TrialState.COMPLETE:
            return
        self.since_check += 1
        checked = {key for key in study.user_attrs if key.startswith(CHECK_PREFIX)}
        if trial.user_attrs.get(records.BASELINE) and check_attr(trial.number) not in checked:
            self._check(study, trial)
            checked.add(check_attr(trial.number))
        if self.since_check >= self.every:
            best = records.best_trial(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            if best is not None and check_attr(best.number) not in checked:
                self._check(study, best)
                checked.add(check_attr(best.number))
                self.since_check = 0
        if checked != self.judged:  # a check of this worker's or another's since the last verdict
            self.judged = checked
            self._judge(study)

    def finish(self, study: optuna.Study) -> None:
        """Guard the final best if it was not yet (``every`` > 1), before the export reads the verdict."""
        best = records.best_trial(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        if best is not None and check_attr(best.number) not in study.user_attrs:
            self._check(study, best)
            self._judge(study)

    def _check(self, study: optuna.Study, trial: FrozenTrial) -> None:
        try:
            scores, image_scores = self.score(trial.params)
        except (AutomergeError, RuntimeError, ValueError) as error:  # a failed guard render: say, go on
            self.warn(f"guard: could not score trial {trial.number}: {error}")
            return
        check = GuardCheck(
            trial=trial.number,
            proxy=float(trial.value),
            scores=scores,
            image_scores=image_scores,
            maximize=self.maximize,
            baseline=bool(trial.user_attrs.get(records.BASELINE)),
        )
        study.set_user_attr(check_attr(trial.number), check.as_attr())

    def _judge(self, study: optuna.Study) -> None:
        verdict = guard_verdict(read_checks(study), tolerance=self.tolerance)
        if verdict.diverged_at is None or verdict.diverged_at == self.warned:
            return
        self.warned = verdict.diverged_at
        self.warn(verdict.reason)
        if self.stop:
            self.reason = f"stopped by the guard at trial {verdict.diverged_at} (guard.stop)"
            study.set_user_attr(records.STOPPED, f"{verdict.reason}; {self.reason}")
            study.stop()


def agreed_trial(study: optuna.Study, *, tolerance: float = 2.0) -> tuple[int, str] | None:
    """(the last best the guard agreed with, why) when the guard disagrees with the study's best;
    None when there are no checks or the guard agrees."""
    verdict = guard_verdict(read_checks(study), tolerance=tolerance)
    if verdict.diverged_at is None or verdict.agreed is None:
        return None
    return verdict.agreed, verdict.reason
