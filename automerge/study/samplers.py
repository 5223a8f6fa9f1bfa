"""Optuna samplers by name. Seeds are offset by the number of trials already in the study so a
resumed run does not replay the random proposals of the first one."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import optuna

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


def _cmaes(config: SamplerConfig, seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.CmaEsSampler(
        seed=seed, n_startup_trials=config.startup_trials, warn_independent_sampling=False
    )


def _random(config: SamplerConfig, seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


def _qmc(config: SamplerConfig, seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False)


for _name, _factory in (("tpe", _tpe), ("gp", _gp), ("cmaes", _cmaes), ("random", _random), ("qmc", _qmc)):
    SAMPLERS.register(_name, _factory)


def make_sampler(config: SamplerConfig, *, existing_trials: int) -> optuna.samplers.BaseSampler:
    """The sampler, built without Optuna's ExperimentalWarning: TPE's ``multivariate``, GP's
    ``deterministic_objective`` and QMC are chosen on purpose, and the warning would print on every run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return SAMPLERS.get(config.name)(config, config.seed + existing_trials)
