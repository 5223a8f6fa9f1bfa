"""Samplers by name: each one the study file accepts builds quietly (experimental flags are chosen on
purpose, so Optuna's ExperimentalWarning would only alarm users on every start)."""

from __future__ import annotations

import warnings

import optuna
import pytest

from automerge.study.config import SamplerConfig
from automerge.study.samplers import SAMPLERS, make_sampler


@pytest.mark.parametrize("name", sorted(SAMPLERS.names()))
def test_every_sampler_builds_without_experimental_warnings(name: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sampler = make_sampler(SamplerConfig(name=name, seed=3, startup_trials=5), existing_trials=2)
    assert isinstance(sampler, optuna.samplers.BaseSampler)
    assert [
        str(w.message) for w in caught if issubclass(w.category, optuna.exceptions.ExperimentalWarning)
    ] == []


def test_a_misspelled_sampler_names_the_registered_ones() -> None:
    from pydantic import ValidationError

    with pytest.raises(
        ValidationError, match=r"unknown sampler 'tpee' \(did you mean 'tpe'\?\); known: cmaes, gp"
    ):
        SamplerConfig(name="tpee")
