"""Optuna samplers by name. Seeds are offset by the number of trials already in the study so a
resumed run does not replay the random proposals of the first one.

``auto``, the default, is Optuna's GP fitted to a log-gap warp of the values (``log_gap``): chosen on
the search suite (``benchmarks/search_suite.py``, BENCHMARKS.md), where it closed more of the gap to
the hidden optimum than random search, TPE and the plain GP."""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial

from automerge.registry import Registry

if TYPE_CHECKING:
    from automerge.study.config import SamplerConfig

SamplerFactory = Callable[["SamplerConfig", int], optuna.samplers.BaseSampler]
SAMPLERS: Registry[SamplerFactory] = Registry("sampler")


def _tpe(config: SamplerConfig, seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=config.startup_trials, multivariate=True)


def _gp(config: SamplerConfig, seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.GPSampler(
        seed=seed, n_startup_trials=config.startup_trials, deterministic_objective=True
    )


def log_gap(values: np.ndarray, *, margin: float) -> np.ndarray:
    """−log(best − v + δ), δ = ``margin`` × (best − worst): monotone in v, so the order of the values
    is kept, but spread near the best, where a distance-type reward (a negative MSE: a narrow valley
    next to a wide plateau) is orders of magnitude finer than far from it."""
    best = float(values.max())
    span = best - float(values.min()) or 1.0
    return -np.log(best - values + margin * span)


Warp = Callable[[np.ndarray], np.ndarray]
"""A monotone map of the (maximised) values of the completed trials to what the GP is fitted to."""


class WarpedGPSampler(optuna.samplers.GPSampler):
    """Optuna's GP fitted to ``warp`` of the (maximised) values instead of the values themselves
    (``auto``: ``log_gap``): a GP on raw values spanning orders of magnitude sees a valley as flat and
    settles on the plateau next to it (issue 12). The study keeps the real values; only the fit is
    warped."""

    def __init__(self, *, warp: Warp, **options: Any) -> None:
        super().__init__(**options)
        self._warp = warp

    # Optuna ≥ 5's hook between reading the completed trials and fitting the GP (pinned in pyproject;
    # tests/study/test_samplers.py fails if it stops being called).
    def _sample_relative_impl(
        self,
        study: Study,
        completed_trials: list[FrozenTrial],
        running_trials: list[FrozenTrial],
        search_space: dict[str, BaseDistribution],
    ) -> dict[str, Any]:
        sign = -1.0 if study.direction == StudyDirection.MINIMIZE else 1.0
        warped = self._warp(np.array([sign * t.value for t in completed_trials]))
        twins = []
        for trial, value in zip(completed_trials, warped, strict=True):
            twin = copy.copy(trial)
            twin.values = [sign * float(value)]
            twins.append(twin)
        return super()._sample_relative_impl(study, twins, running_trials, search_space)


def _auto(config: SamplerConfig, seed: int) -> optuna.samplers.BaseSampler:
    return WarpedGPSampler(
        warp=functools.partial(log_gap, margin=config.warp_margin),
        seed=seed,
        n_startup_trials=config.startup_trials,
        deterministic_objective=True,
    )


def _cmaes(config: SamplerConfig, seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.CmaEsSampler(
        seed=seed, n_startup_trials=config.startup_trials, warn_independent_sampling=False
    )


def _random(config: SamplerConfig, seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


def _qmc(config: SamplerConfig, seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False)


for _name, _factory in (
    ("auto", _auto),
    ("tpe", _tpe),
    ("gp", _gp),
    ("cmaes", _cmaes),
    ("random", _random),
    ("qmc", _qmc),
):
    SAMPLERS.register(_name, _factory)


def make_sampler(config: SamplerConfig, *, existing_trials: int) -> optuna.samplers.BaseSampler:
    """The sampler, built without Optuna's ExperimentalWarning: TPE's ``multivariate``, GP's
    ``deterministic_objective`` and QMC are chosen on purpose, and the warning would print on every run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return SAMPLERS.get(config.name)(config, config.seed + existing_trials)
