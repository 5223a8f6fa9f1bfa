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
        sampler = make_sampler(SamplerConfig(name=name, seed=3, startup_trials=5))
    assert isinstance(sampler, optuna.samplers.BaseSampler)
    assert [
        str(w.message) for w in caught if issubclass(w.category, optuna.exceptions.ExperimentalWarning)
    ] == []


def test_a_misspelled_sampler_names_the_registered_ones() -> None:
    from pydantic import ValidationError

    with pytest.raises(
        ValidationError, match=r"unknown sampler 'tpee' \(did you mean 'tpe'\?\); known: auto, cmaes, gp"
    ):
        SamplerConfig(name="tpee")


def test_the_log_gap_warp_keeps_the_order_and_spreads_the_values_near_the_best() -> None:
    import numpy as np

    from automerge.study.samplers import log_gap

    values = np.array([-2e-3, -1e-3, -1e-5, -1e-6, -2e-6])
    warped = log_gap(values, margin=0.01)
    assert list(np.argsort(warped)) == list(np.argsort(values))
    # raw: the three best are within 0.5 % of the range of each other; warped: far apart
    span = warped.max() - warped.min()
    assert (warped[3] - warped[2]) / span > 0.05 and (values[3] - values[2]) / np.ptp(values) < 0.005


def test_auto_fits_its_gp_to_the_warped_values_and_the_study_keeps_the_real_ones(monkeypatch) -> None:
    """The warp goes through Optuna's GP hook; if Optuna stops calling it, this fails."""
    import numpy as np

    from automerge.study.samplers import log_gap

    seen: list[list[float]] = []
    real = optuna.samplers.GPSampler._sample_relative_impl

    def spy(self, study, completed, running, space):
        seen.append([t.value for t in completed])
        return real(self, study, completed, running, space)

    monkeypatch.setattr(optuna.samplers.GPSampler, "_sample_relative_impl", spy)
    sampler = make_sampler(SamplerConfig(name="auto", seed=0, startup_trials=4))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(lambda t: -((t.suggest_float("x", 0, 1) - 0.3) ** 2), n_trials=6)
    values = [t.value for t in study.trials]
    assert len(seen) == 2 and all(v <= 0 for v in values)  # the study holds the real values
    np.testing.assert_allclose(seen[-1], log_gap(np.array(values[:5]), margin=0.01))


def test_auto_is_the_default_sampler() -> None:
    """Chosen on the search suite (BENCHMARKS.md): with DistinctProposals, 'auto' closed more of the gap
    than plain GP at 50 and 100 trials (medians, both families) and far more than random and TPE."""
    assert SamplerConfig().name == "auto"


def _ask_together(storage: optuna.storages.BaseStorage, name: str, workers: int) -> list[float]:
    """``workers`` workers on one study (each its own sampler, built at the same instant, as separate
    processes would), each asking a trial before any is told: their proposals for x."""
    config = SamplerConfig(name=name, seed=0, startup_trials=5)
    studies = [
        optuna.load_study(study_name="shared", storage=storage, sampler=make_sampler(config))
        for _ in range(workers)
    ]
    trials = [study.ask() for study in studies]
    values = [trial.suggest_float("x", 0.0, 1.0) for trial in trials]
    for study, trial in zip(studies, trials, strict=True):
        study.tell(trial, -values[0])
    return values


@pytest.mark.parametrize("name", ["random", "tpe", "auto", "cmaes"])
def test_workers_that_start_together_propose_different_points(name: str) -> None:
    storage = optuna.storages.InMemoryStorage()
    optuna.create_study(study_name="shared", storage=storage)
    first = _ask_together(storage, name, workers=3)
    assert len(set(first)) == 3  # Optuna's one seed per sampler gave all three the same point


def test_the_same_study_state_gives_the_same_proposals() -> None:
    runs = []
    for _ in range(2):
        storage = optuna.storages.InMemoryStorage()
        optuna.create_study(study_name="shared", storage=storage)
        runs.append(_ask_together(storage, "random", workers=2) + _ask_together(storage, "tpe", workers=2))
    assert runs[0] == runs[1]


def test_distinct_proposals_replace_a_repeat_of_an_earlier_point_by_a_near_unseen_one() -> None:
    """Optuna's GP with a deterministic objective re-proposes the incumbent (issue 12: up to 130 of 200
    trials): a repeat costs a full render and teaches nothing. The guard moves it to a near grid point
    no trial holds; proposals that are new pass unchanged."""
    from automerge.study.samplers import DistinctProposals

    class Repeater(optuna.samplers.RandomSampler):
        """Proposes x = y = 0.5 for every trial after the first two."""

        def infer_relative_search_space(self, study, trial):
            return optuna.search_space.intersection_search_space(study.get_trials(deepcopy=False))

        def sample_relative(self, study, trial, space):
            return {name: 0.5 for name in space} if trial.number >= 2 else {}

    study = optuna.create_study(direction="maximize", sampler=DistinctProposals(Repeater(seed=0), seed=1))
    study.enqueue_trial({"x": 0.5, "y": 0.5})

    def objective(trial: optuna.Trial) -> float:
        x, y = (trial.suggest_float(n, 0, 1, step=0.05) for n in "xy")
        return -((x - 0.5) ** 2) - (y - 0.5) ** 2

    study.optimize(objective, n_trials=12)
    points = [(t.params["x"], t.params["y"]) for t in study.trials]
    assert len(set(points)) == len(points)  # no repeats
    assert study.trials[2].params != {"x": 0.5, "y": 0.5}
    for x, y in points[2:]:  # on the grid and near the repeated point
        assert abs(x / 0.05 - round(x / 0.05)) < 1e-9 and abs(y / 0.05 - round(y / 0.05)) < 1e-9
        assert abs(x - 0.5) <= 0.35 and abs(y - 0.5) <= 0.35
    assert study.sampler.replaced == 10


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_distinct_proposals_leave_new_points_alone() -> None:
    from automerge.study.samplers import DistinctProposals

    inner = optuna.samplers.GPSampler(seed=0, n_startup_trials=4, deterministic_objective=True)
    plain = optuna.samplers.GPSampler(seed=0, n_startup_trials=4, deterministic_objective=True)
    plain, guarded = (
        optuna.create_study(sampler=plain),
        optuna.create_study(sampler=DistinctProposals(inner, seed=0)),
    )
    for study in (plain, guarded):
        study.optimize(lambda t: (t.suggest_float("x", -1, 1) - 0.2) ** 2, n_trials=8)
    assert [t.params for t in guarded.trials] == [t.params for t in plain.trials]
    assert guarded.sampler.replaced == 0


def test_auto_never_spends_a_trial_on_a_point_already_evaluated() -> None:
    """On the search suite the warped GP re-proposed its incumbent (auto: a median of 17 of 200
    trials, up to 139): auto is the warped GP (with local steps) behind DistinctProposals."""
    from automerge.study.samplers import DistinctProposals, LocalSteps, WarpedGPSampler

    sampler = make_sampler(SamplerConfig(name="auto", seed=0, startup_trials=4))
    assert isinstance(sampler.inner, DistinctProposals) and isinstance(sampler.inner.inner, LocalSteps)
    assert isinstance(sampler.inner.inner.inner, WarpedGPSampler)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(lambda t: -((t.suggest_float("x", 0, 1, step=0.025) - 0.3) ** 2), n_trials=16)
    points = [t.params["x"] for t in study.trials]
    assert all(x not in points[:i] for i, x in enumerate(points) if i >= 4)  # GP's proposals: none twice
    assert sampler.inner.replaced > 0  # the exact optimum 0.3 is on the grid: the GP wanted it again


def test_local_steps_move_one_coordinate_of_the_best_trial_on_their_turns() -> None:
    """Once ``after`` trials are complete, every ``every``-th trial is the best complete trial with
    exactly one coordinate moved (on the grid, in the range); the other trials are the inner
    sampler's own (issue 12: a dimension that moves the reward little is measured alone)."""
    from automerge.study.samplers import LocalSteps

    class Fixed(optuna.samplers.RandomSampler):
        """Proposes x = y = z = 0.9 (far from the best) for every trial after the first five."""

        def infer_relative_search_space(self, study, trial):
            return optuna.search_space.intersection_search_space(study.get_trials(deepcopy=False))

        def sample_relative(self, study, trial, space):
            return {name: 0.9 for name in space} if trial.number >= 5 else {}

    sampler = LocalSteps(Fixed(seed=0), seed=1, every=3, after=6, mode="gaussian")
    study = optuna.create_study(direction="maximize", sampler=sampler)

    def objective(trial: optuna.Trial) -> float:
        point = [trial.suggest_float(n, 0, 1, step=0.01) for n in "xyz"]
        return -sum((v - 0.2) ** 2 for v in point) + 1e-9 * trial.number  # later trials win ties

    study.optimize(objective, n_trials=30)
    for trial in study.trials[6:]:
        params = trial.params
        if trial.number % 3 != 0:
            assert params == {"x": 0.9, "y": 0.9, "z": 0.9}
            continue
        best = max((t for t in study.trials[: trial.number] if t.value is not None), key=lambda t: t.value)
        moved = [n for n in "xyz" if params[n] != best.params[n]]
        assert len(moved) <= 1, (trial.number, params, best.params)
        for value in params.values():
            assert 0 <= value <= 1 and abs(value * 100 - round(value * 100)) < 1e-6
    assert sampler.steps == len([n for n in range(6, 30) if n % 3 == 0])
    assert study.best_value > max(t.value for t in study.trials[:6])  # the steps improved the best


def test_compass_delta_doubles_on_a_win_and_halves_and_reverses_on_a_loss() -> None:
    from automerge.study.samplers import compass_delta

    def step(history, value=0.3):
        return compass_delta(history, value=value, low=0.0, high=1.0)

    assert step([]) == 0.1 and step([], value=0.8) == -0.1  # 10 % of the range towards the middle
    assert step([(0.1, True)]) == 0.2  # a win: twice as far the same way
    assert step([(0.1, False)]) == -0.05  # a loss: half of it, the other way
    assert step([(0.2, True), (-0.2, False)]) == 0.1  # only the last step counts
    assert step([(0.8, True), (1.6, True)]) == 1.0  # never more than the range
    assert step([(0.003, False)]) == 0.1  # below 0.2 % of the range: again from 10 %


def test_compass_steps_take_the_coordinates_in_turn_and_find_a_weak_one_on_an_edge() -> None:
    """The demo's failure (issue 12): a coordinate that moves the objective 100× less than the others,
    left by the global phase on a range edge. Compass steps from the incumbent take each coordinate in
    turn and walk the weak one to its optimum."""
    from automerge.study.samplers import LOCAL_STEP, LocalSteps

    class Stuck(optuna.samplers.RandomSampler):
        """Proposes the strong coordinates at their optimum and the weak one on its far edge."""

        def infer_relative_search_space(self, study, trial):
            return optuna.search_space.intersection_search_space(study.get_trials(deepcopy=False))

        def sample_relative(self, study, trial, space):
            return {"strong1": 0.3, "strong2": 0.7, "weak": 1.0} if space else {}

    sampler = LocalSteps(Stuck(seed=0), seed=0, every=2, after=2, mode="compass")
    study = optuna.create_study(direction="minimize", sampler=sampler)

    def objective(trial: optuna.Trial) -> float:
        a, b = trial.suggest_float("strong1", 0, 1), trial.suggest_float("strong2", 0, 1)
        weak = trial.suggest_float("weak", 0, 1)
        return (a - 0.3) ** 2 + (b - 0.7) ** 2 + 0.01 * (weak - 0.4) ** 2

    study.optimize(objective, n_trials=60)
    steps = [t for t in study.trials if LOCAL_STEP in t.system_attrs]
    assert [t.system_attrs[LOCAL_STEP]["name"] for t in steps[:6]] == ["strong1", "strong2", "weak"] * 2
    for step in steps:  # one coordinate of the incumbent moved
        best = min(study.trials[: step.number], key=lambda t: t.value)
        assert sum(step.params[n] != best.params[n] for n in step.params) == 1, (step.params, best.params)
    assert abs(study.best_params["weak"] - 0.4) < 0.02, study.best_params


def test_local_steps_are_off_with_every_zero() -> None:
    from automerge.study.samplers import LocalSteps

    inner = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(sampler=LocalSteps(inner, seed=0, every=0, after=0))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=6)
    assert study.sampler.steps == 0


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_each_sampler_name_builds_the_intended_optuna_sampler_with_its_settings() -> None:
    """Only isinstance(BaseSampler) was checked: mapping `gp` to the random sampler passed (issue 15)."""
    from automerge.study.samplers import DistinctProposals, LocalSteps, WarpedGPSampler

    def built(name: str) -> optuna.samplers.BaseSampler:
        return make_sampler(SamplerConfig(name=name, seed=3, startup_trials=7)).inner

    gp = built("gp")
    assert type(gp) is optuna.samplers.GPSampler and gp._deterministic and gp._n_startup_trials == 7
    tpe = built("tpe")
    assert type(tpe) is optuna.samplers.TPESampler and tpe._multivariate and tpe._n_startup_trials == 7
    cmaes = built("cmaes")
    assert type(cmaes) is optuna.samplers.CmaEsSampler and cmaes._n_startup_trials == 7
    assert not cmaes._warn_independent_sampling  # the grouped search is relative; no warning per trial
    assert cmaes._cma_rng.rng.randint(1 << 30) == built("cmaes")._cma_rng.rng.randint(1 << 30)  # seeded
    assert type(built("random")) is optuna.samplers.RandomSampler
    qmc = built("qmc")
    assert type(qmc) is optuna.samplers.QMCSampler and qmc._scramble and not qmc._warn_independent_sampling
    assert qmc._seed is not None and qmc._seed == built("qmc")._seed
    auto = built("auto")
    assert type(auto) is DistinctProposals and type(auto.inner) is LocalSteps
    assert (auto.inner.every, auto.inner.after, auto.inner.mode) == (3, 20, "compass")
    warped = auto.inner.inner
    assert type(warped) is WarpedGPSampler and warped._deterministic and warped._n_startup_trials == 7
    knobs = SamplerConfig(name="auto", seed=3, local_every=5, local_after=9, local_steps="gaussian")
    tuned = make_sampler(knobs).inner.inner  # the study's knobs, not LocalSteps' own defaults
    assert (tuned.every, tuned.after, tuned.mode) == (5, 9, "gaussian")


def test_a_local_step_has_sigma_scale_times_the_range_and_stays_on_the_grid_and_in_range() -> None:
    import numpy as np
    from optuna.distributions import FloatDistribution, IntDistribution

    from automerge.study.samplers import _moved

    rng = np.random.RandomState(0)
    wide = FloatDistribution(0.0, 10.0)
    steps = np.array([_moved(wide, 5.0, 0.01, rng) - 5.0 for _ in range(2000)])
    assert 0.09 < steps.std() < 0.11  # σ = 1 % of a range of 10
    near_top = [_moved(wide, 9.9, 0.3, rng) for _ in range(500)]
    assert max(near_top) == 10.0 and min(near_top) >= 0.0  # clipped at both ends
    log = FloatDistribution(1e-4, 1.0, log=True)
    moved = np.array([_moved(log, 1e-2, 0.1, rng) for _ in range(2000)])
    assert moved.min() >= 1e-4 and moved.max() <= 1.0
    assert 0.8 < np.log(moved / 1e-2).std() / (0.1 * np.log(1e4)) < 1.2  # σ in log space
    stepped = FloatDistribution(0.0, 1.0, step=0.25)
    assert {_moved(stepped, 0.5, 0.3, rng) for _ in range(300)} <= {0.0, 0.25, 0.5, 0.75, 1.0}
    counts = IntDistribution(1, 9)
    ints = [_moved(counts, 5, 0.3, rng) for _ in range(300)]
    assert all(type(n) is int and 1 <= n <= 9 for n in ints) and len(set(ints)) > 3
