"""The strategies the search suite compares: every sampler a study file accepts, as ``automerge
optimize`` builds it, plus candidate variants measured here before any becomes a product default.

A strategy is a factory ``(seed) -> optuna sampler``; all of them see the study's values as they are
(negative MSE here), maximised.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial
from scipy.special import ndtri
from scipy.stats import rankdata

from automerge.study import SAMPLERS, SamplerConfig, make_sampler

Strategy = Callable[[int], optuna.samplers.BaseSampler]
STARTUP = 10


def _product(name: str) -> Strategy:
    def factory(seed: int) -> optuna.samplers.BaseSampler:
        config = SamplerConfig(name=name, seed=seed, startup_trials=STARTUP)
        return make_sampler(config, existing_trials=0)

    return factory


def _quiet(build: Callable[[], optuna.samplers.BaseSampler]) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return build()


def _gp_noisy(seed: int) -> optuna.samplers.BaseSampler:
    """Optuna's GP with its default noise model (``deterministic_objective=False``)."""
    return _quiet(lambda: optuna.samplers.GPSampler(seed=seed, n_startup_trials=STARTUP))


def _tpe_grouped(seed: int) -> optuna.samplers.BaseSampler:
    return _quiet(
        lambda: optuna.samplers.TPESampler(seed=seed, n_startup_trials=STARTUP, multivariate=True, group=True)
    )


def _cmaes_lr(seed: int) -> optuna.samplers.BaseSampler:
    """CMA-ES with learning-rate adaptation (the restart strategies left Optuna in 4.4)."""
    return _quiet(
        lambda: optuna.samplers.CmaEsSampler(
            seed=seed, n_startup_trials=STARTUP, lr_adapt=True, warn_independent_sampling=False
        )
    )


Warp = Callable[[np.ndarray], np.ndarray]


def rank_scores(values: np.ndarray) -> np.ndarray:
    """Φ⁻¹((rank − ½)/n): the Gaussian copula of the values, which keeps only their order."""
    return ndtri((rankdata(values) - 0.5) / len(values))


def log_gap(values: np.ndarray) -> np.ndarray:
    """−log(best − v + δ), δ = 1 % of the value range: spreads the values near the best (where a
    distance-type reward is orders of magnitude finer than far away) and keeps their order."""
    span = float(values.max() - values.min()) or 1.0
    return -np.log(values.max() - values + 0.01 * span)


class WarpedGPSampler(optuna.samplers.GPSampler):
    """Optuna's GP fitted to a monotone warp of the (maximised) values instead of the values."""

    def __init__(self, *, warp: Warp, **options: Any) -> None:
        super().__init__(**options)
        self._warp = warp

    def _sample_relative_impl(
        self,
        study: Study,
        completed_trials: list[FrozenTrial],
        running_trials: list[FrozenTrial],
        search_space: dict[str, BaseDistribution],
    ) -> dict[str, Any]:
        sign = -1.0 if study.direction == StudyDirection.MINIMIZE else 1.0
        warped = self._warp(np.array([sign * t.value for t in completed_trials]))
        return super()._sample_relative_impl(
            study, _revalued(completed_trials, sign * warped), running_trials, search_space
        )


def _revalued(trials: Sequence[FrozenTrial], values: np.ndarray) -> list[FrozenTrial]:
    twins = []
    for trial, value in zip(trials, values, strict=True):
        twin = copy.copy(trial)
        twin.values = [float(value)]
        twins.append(twin)
    return twins


def _warped_gp(warp: Warp, *, deterministic: bool = True) -> Strategy:
    def factory(seed: int) -> optuna.samplers.BaseSampler:
        return _quiet(
            lambda: WarpedGPSampler(
                warp=warp, seed=seed, n_startup_trials=STARTUP, deterministic_objective=deterministic
            )
        )

    return factory


CANDIDATES: dict[str, Strategy] = {
    "gp-rank": _warped_gp(rank_scores),
    "gp-loggap": _warped_gp(log_gap),
    "gp-noisy": _gp_noisy,
    "tpe-grouped": _tpe_grouped,
    "cmaes-lr": _cmaes_lr,
}


def strategies() -> dict[str, Strategy]:
    """Every product sampler by its study-file name, then the candidates."""
    return {**{name: _product(name) for name in SAMPLERS.names()}, **CANDIDATES}
