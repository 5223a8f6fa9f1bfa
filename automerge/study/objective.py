"""The per-trial sequence, as a numbered straight line: propose → merge in place → render → score →
record. A failing trial becomes a FAIL trial with its reason, not a stopped study."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from automerge.errors import AutomergeError, RenderError
from automerge.merge import BlockParams
from automerge.render.checks import (
    image_stats,
    near_duplicate,
    near_duplicate_threshold,
    nearest_prompts,
    stats_outlier,
)
from automerge.study import records
from automerge.study.runtime import Evaluation, Report, StudyRuntime

log = logging.getLogger("automerge.study")


_Calibration = tuple[list[dict[str, list[float]]], list[float]]
"""The baselines' image statistics (``records.IMAGE_STATS``) and nearest prompt distances."""


class TrialFailed(AutomergeError):
    """A trial's merge, render or reward failed; the study marks it FAIL and goes on."""


class Objective:
    """Optuna's objective: one trial of a study, timed stage by stage."""

    def __init__(
        self,
        runtime: StudyRuntime,
        *,
        store: FileSystemArtifactStore,
        on_trial: Callable[[int, Evaluation], None],
        on_stage: Callable[[str], None] | None = None,
        budget: int | None = None,
        interruptible: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> None:
        self.runtime = runtime
        self.store = store
        self.on_trial = on_trial  # called with (trial number, evaluation) after each completed trial
        self.on_stage = on_stage or (lambda name: None)  # told each stage's name as it starts
        self.budget = budget  # the study's total trials, shared by every worker (None: no limit)
        self.interruptible = interruptible  # where Ctrl-C/SIGTERM may raise (see interruption.py)
        self.restart_sampler_clock()
        self._baselines_done: _Calibration | None = None  # see _calibration

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        if self.budget is not None and places_before(trial) >= self.budget:
            records.write_failure(trial, records.OVER_BUDGET)
            trial.study.stop()
            raise TrialFailed(records.OVER_BUDGET)
        try:
            # 1. Proposal: the gap since the last trial ended (Optuna's own work) plus the suggest calls,
            #    where Optuna 5 computes multivariate proposals (GP, CMA-ES, multivariate TPE).
            with self.interruptible():
                self.on_stage("propose")
                values = self.runtime.space.suggest(trial)
                sampler_seconds = time.perf_counter() - self.last_finished
                params = self.runtime.space.block_params(values)
                # 2.–4. Merge in place, render and score: the previews first (multi-fidelity), then
                #       payload by payload; the pruner may stop the trial after each.
                evaluation = self._evaluate(trial, params)
            # 5. Sanity of the images against the baselines' (noise, saturation; two prompts' images
            #    nearly alike): a merge far outside them fails here instead of being scored (reward
            #    models score such images too well).
            stats = {key: image_stats(image) for key, image in evaluation.images.items()}
            nearest = nearest_prompts(
                [
                    (job.job, evaluation.images[job.key])
                    for job in self.runtime.jobs
                    if job.key in evaluation.images
                ]
            )
            if records.BASELINE not in trial.user_attrs:
                baseline_stats, baseline_distances = self._calibration(trial.study)
                reason = stats_outlier(stats, baseline_stats) or near_duplicate(
                    nearest, near_duplicate_threshold(baseline_distances)
                )
                if reason is not None:
                    raise RenderError(reason)
            # 6. Bookkeeping: scores, timings and images for the dashboard and the report.
            self.on_stage("record")
            started = time.perf_counter()
            records.write_evaluation(
                trial,
                payload_scores=evaluation.payload_scores,
                reward_scores=evaluation.reward_scores,
                images=self._upload_images(trial, evaluation),
                image_scores=evaluation.image_scores,
                image_stats={key: value.as_list() for key, value in stats.items()},
                objective_scores=evaluation.objective_scores,
                objective_image_scores=evaluation.objective_image_scores,
                prompt_distance=None if nearest is None else nearest.distance,
            )
            evaluation.timings["bookkeeping"] = time.perf_counter() - started
            evaluation.timings["sampler"] = sampler_seconds
            records.write_timings(trial, evaluation.timings)
            self.on_trial(trial.number, evaluation)
            return evaluation.told
        except optuna.TrialPruned:
            records.write_pruned(trial)
            raise
        except KeyboardInterrupt:
            records.write_failure(trial, records.INTERRUPTED)
            raise
        except Exception as error:  # merge/render/reward failures: record, mark FAIL, go on
            reason = f"{type(error).__name__}: {error}"
            records.write_failure(trial, reason)
            log.info("trial %d failed: %s", trial.number, reason)  # the progress display shows it
            raise TrialFailed(reason) from error
        finally:
            self.restart_sampler_clock()

    def restart_sampler_clock(self) -> None:
        """The next trial's proposal time (Optuna's own work between trials) is counted from now."""
        self.last_finished = time.perf_counter()

    def _calibration(self, study: optuna.Study) -> _Calibration:
        """The baselines' image statistics and nearest prompt distances: read from the storage until
        every baseline has them, then kept (they never change), so later trials do not read every
        trial back."""
        if self._baselines_done is None:
            calibration = (records.baseline_image_stats(study), records.baseline_prompt_distances(study))
            if len(calibration[0]) < len(self.runtime.space.baselines()) or not self.runtime.study.baselines:
                return calibration
            self._baselines_done = calibration
        return self._baselines_done

    def _evaluate(self, trial: optuna.Trial, params: BlockParams) -> Evaluation:
        """Each preview rung, reported at steps 0..F−1, then the full payload at F, F+1, ...; the
        trial's timings add up every evaluation it made. A study with several objectives reports
        nothing (Optuna prunes single-objective studies only)."""
        report = _reporter(trial) if len(self.runtime.objectives) == 1 else _no_report
        previews = []
        for rung, jobs in enumerate(self.runtime.preview_jobs):
            previews.append(self.runtime.evaluate(params, jobs, on_stage=self.on_stage))
            report(rung, previews[-1].value)  # raises TrialPruned unless promoted
        rungs = len(previews)
        evaluation = self.runtime.evaluate(
            params,
            self.runtime.jobs,
            report=lambda step, value: report(rungs + step, value),
            on_stage=self.on_stage,
        )
        for preview in previews:
            for stage, seconds in preview.timings.items():
                evaluation.timings[stage] = evaluation.timings.get(stage, 0.0) + seconds
        return evaluation

    def _upload_images(self, trial: optuna.Trial, evaluation: Evaluation) -> dict[str, str]:
        """Each image as an Optuna artifact of the trial (optuna-dashboard shows them); key → id."""
        ids = {}
        with tempfile.TemporaryDirectory() as folder:
            for key, image in evaluation.images.items():
                path = Path(folder) / f"{key}.png"
                image.save(path, format="PNG", compress_level=1)
                ids[key] = upload_artifact(
                    artifact_store=self.store, file_path=str(path), study_or_trial=trial, mimetype="image/png"
                )
        return ids


def places_before(trial: optuna.Trial) -> int:
    """How many trials numbered before ``trial`` hold a place in the budget (counted, running or
    queued). Trial numbers are given by the storage in order, so when workers race for the last place
    exactly the lower number gets it."""
    taken = trial.study.get_trials(deepcopy=False, states=records.TAKEN_STATES)
    return sum(1 for other in taken if other.number < trial.number)


def _no_report(step: int, value: float) -> None:
    pass


def _reporter(trial: optuna.Trial) -> Report:
    def report(step: int, value: float) -> None:
        trial.report(value, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after payload {step}")

    return report
