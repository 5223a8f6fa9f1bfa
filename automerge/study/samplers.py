"""Optuna samplers by name, each seeded from (study seed, number of the worker's first trial): a resumed
run does not replay the first run's proposals, and workers sharing a study do not propose the same
points.

``auto`` is the default: Optuna's GP (deterministic objective) fitted to a log-gap warp of the values
(``log_gap``), with every third trial after the first 20 a one-coordinate step from the incumbent
(``LocalSteps``, compass steps: the coordinates in turn, Rosenbrock's step rule), behind
``DistinctProposals`` (a repeat of an evaluated point becomes a near unseen one). Chosen on the search suite (``benchmarks/search_suite.py``, BENCHMARKS.md) against plain ``gp``,
TPE and random search. The others stay selectable."""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers._lazy_random_state import LazyRandomState
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

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


class SamplerWrapper(optuna.samplers.BaseSampler):
    """A sampler that hands every call to ``inner``; subclasses override the calls they change."""

    def __init__(self, inner: optuna.samplers.BaseSampler) -> None:
        self.inner = inner

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.inner.before_trial(study, trial)

    def after_trial(
        self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


class SeededWrapper(SamplerWrapper):
    """A wrapper with a random state of its own, reseeded with ``inner``'s."""

    def __init__(self, inner: optuna.samplers.BaseSampler, *, seed: int | None = None) -> None:
        super().__init__(inner)
        self._rng = LazyRandomState(seed)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()
        self._rng.rng.seed()


class DistinctProposals(SeededWrapper):
    """``inner``, except that a relative proposal equal to the parameters of a trial the study already
    holds (complete, running or waiting) is moved to a near grid point that none holds: each
    coordinate moved by a Gaussian step of σ = ``spread`` × its range (σ doubling every 8 draws that
    still repeat), rounded to the step and clipped to the range; after 32 such draws the trial falls
    back to ``inner``'s independent sampling.

    Optuna's GP with a deterministic objective re-proposes its incumbent (issue 12: up to 130 of 200
    trials on the search suite), and a repeat costs a full render without teaching anything."""

    def __init__(
        self, inner: optuna.samplers.BaseSampler, *, seed: int | None = None, spread: float = 0.05
    ) -> None:
        super().__init__(inner, seed=seed)
        self.spread = spread
        self.replaced = 0

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        proposal = self.inner.sample_relative(study, trial, search_space)
        names = sorted(proposal)
        if not names or any(not _numeric(search_space[name]) for name in names):
            return proposal
        held = {
            tuple(_key(t.params.get(name)) for name in names)
            for t in study.get_trials(deepcopy=False, states=_HELD)
            if t.number != trial.number
        }
        if tuple(_key(proposal[name]) for name in names) not in held:
            return proposal
        self.replaced += 1
        for attempt in range(32):
            scale = self.spread * 2 ** (attempt // 8)
            moved = {name: _moved(search_space[name], proposal[name], scale, self._rng.rng) for name in names}
            if tuple(_key(moved[name]) for name in names) not in held:
                return moved
        return {}


LOCAL_STEP = "automerge:local_step"
"""System attribute of a compass step's trial: {"name", "delta" (in the search scale), "from" (the
incumbent's value when it was proposed)}; the study's record of each coordinate's step size."""


class LocalSteps(SeededWrapper):
    """``inner``, except that once ``after`` trials are complete, every ``every``-th trial (by number)
    is a local step: the best complete trial's parameters with one coordinate moved.

    ``mode`` "gaussian": a random coordinate, moved by a Gaussian step of σ = s × its range, s
    log-uniform in [1 %, 30 %]. ``mode`` "compass": the coordinates in turn, each with a step kept in
    the study (``compass_delta``): doubled after a step that beat the incumbent, halved and reversed
    after one that did not. Rounded to the grid, clipped to the range.

    A GP's acquisition leaves a dimension that moves the reward little (the deepest UNet blocks on
    small renders) wherever its first good trials put it, often on a range edge; a one-coordinate
    step from the incumbent measures that dimension alone, with the others at their best values
    (issue 12: the demo's MID group)."""

    def __init__(
        self,
        inner: optuna.samplers.BaseSampler,
        *,
        seed: int | None = None,
        every: int = 3,
        after: int = 20,
        mode: str = "compass",
    ) -> None:
        super().__init__(inner, seed=seed)
        if mode not in ("gaussian", "compass"):
            raise ValueError(f"local step mode {mode!r}: gaussian or compass")
        self.every = every
        self.after = after
        self.mode = mode
        self.steps = 0

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        names = sorted(search_space)
        if not self._local_turn(study, trial) or any(not _numeric(search_space[name]) for name in names):
            return self.inner.sample_relative(study, trial, search_space)
        best = _best_complete(study)
        if best is None or any(name not in best.params for name in names):
            return self.inner.sample_relative(study, trial, search_space)
        point = {name: best.params[name] for name in names}
        if self.mode == "compass":
            name, delta = _compass(study, trial, names, point, search_space)
            point[name] = _shifted(search_space[name], point[name], delta)
            record = {"name": name, "delta": delta, "from": best.value}
            study._storage.set_trial_system_attr(trial._trial_id, LOCAL_STEP, record)
        else:
            rng = self._rng.rng
            name = names[rng.randint(len(names))]
            scale = float(np.exp(rng.uniform(np.log(0.01), np.log(0.3))))
            point[name] = _moved(search_space[name], point[name], scale, rng)
        self.steps += 1
        return point

    def _local_turn(self, study: Study, trial: FrozenTrial) -> bool:
        if self.every <= 0 or trial.number % self.every != 0:
            return False
        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= self.after


CompassStep = tuple[float, bool]
"""An earlier compass step on one coordinate: (delta in the search scale, whether it beat the
incumbent it started from)."""

_COMPASS_FIRST = 0.1  # the first step of a coordinate, as a fraction of its range
_COMPASS_FLOOR = 0.002  # below this fraction of the range a coordinate's step starts again


def compass_delta(history: Sequence[CompassStep], *, value: float, low: float, high: float) -> float:
    """The next step of one coordinate (at ``value`` in [low, high], search scale) from its earlier
    steps, oldest first (Rosenbrock's rule): none → 10 % of the range towards the middle; the last one
    won → twice it; it lost → half of it the other way. Below 0.2 % of the range it starts again."""
    span = high - low
    towards_middle = 1.0 if value <= (low + high) / 2 else -1.0
    if not history:
        return towards_middle * _COMPASS_FIRST * span
    delta, won = history[-1]
    delta = 2 * delta if won else -delta / 2
    if abs(delta) < _COMPASS_FLOOR * span:
        return towards_middle * _COMPASS_FIRST * span
    return float(np.clip(delta, -span, span))


def _compass(
    study: Study,
    trial: FrozenTrial,
    names: Sequence[str],
    point: dict[str, Any],
    search_space: dict[str, BaseDistribution],
) -> tuple[str, float]:
    """(coordinate, delta) of the next compass step: the coordinates in turn (by the number of compass
    steps the study holds), each from its own finished steps."""
    records = [
        (t, t.system_attrs[LOCAL_STEP])
        for t in study.get_trials(deepcopy=False)
        if LOCAL_STEP in t.system_attrs and t.number != trial.number
    ]
    name = names[len(records) % len(names)]
    maximize = study.direction == StudyDirection.MAXIMIZE
    history = [
        (float(record["delta"]), t.state == TrialState.COMPLETE and _beats(t.value, record["from"], maximize))
        for t, record in sorted(records, key=lambda pair: pair[0].number)
        if record["name"] == name and t.state.is_finished()
    ]
    low, high, value = _search_scale(search_space[name], point[name])
    delta = compass_delta(history, value=value, low=low, high=high)
    if float(np.clip(value + delta, low, high)) == value:
        delta = -delta  # on the edge it points out of: the step goes inwards
    return name, delta


def _beats(value: float | None, incumbent: float | None, maximize: bool) -> bool:
    if value is None or incumbent is None:
        return False
    return value > incumbent if maximize else value < incumbent


def _search_scale(
    distribution: optuna.distributions.FloatDistribution | optuna.distributions.IntDistribution, value: float
) -> tuple[float, float, float]:
    """(low, high, value) on the scale steps are taken in: log for a log range."""
    if distribution.log:
        return float(np.log(distribution.low)), float(np.log(distribution.high)), float(np.log(value))
    return float(distribution.low), float(distribution.high), float(value)


def _shifted(
    distribution: optuna.distributions.FloatDistribution | optuna.distributions.IntDistribution,
    value: float,
    delta: float,
) -> float:
    """``value`` + ``delta`` on the search scale, on the distribution's grid and inside its range."""
    low, high, at = _search_scale(distribution, value)
    return _on_grid(distribution, float(np.clip(at + delta, low, high)))


def _best_complete(study: Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no complete trial
        return None


_HELD = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING, TrialState.PRUNED)


def _numeric(distribution: BaseDistribution) -> bool:
    return isinstance(
        distribution, optuna.distributions.FloatDistribution | optuna.distributions.IntDistribution
    )


def _key(value: Any) -> Any:
    """A parameter value as compared for repeats (floats to 12 significant digits: grid values
    computed twice may differ in the last bit)."""
    return float(f"{value:.12g}") if isinstance(value, float) else value


def _moved(
    distribution: optuna.distributions.FloatDistribution | optuna.distributions.IntDistribution,
    value: float,
    scale: float,
    rng: np.random.RandomState,
) -> float:
    """``value`` plus a Gaussian step of σ = ``scale`` × the range (in log space for a log range), on
    the distribution's grid and inside its range."""
    low, high, at = _search_scale(distribution, value)
    return _on_grid(distribution, float(np.clip(at + rng.normal(0.0, scale * (high - low)), low, high)))


def _on_grid(
    distribution: optuna.distributions.FloatDistribution | optuna.distributions.IntDistribution,
    moved: float,
) -> float:
    """A point of the search scale back in the distribution: exp for a log range, rounded to its step."""
    if distribution.log:
        moved = float(np.exp(moved))
    step = distribution.step
    if step is not None:
        moved = distribution.low + round((moved - distribution.low) / step) * step
        moved = min(max(moved, distribution.low), distribution.high)
    if isinstance(distribution, optuna.distributions.IntDistribution):
        return int(round(moved))
    return moved


def _auto(config: SamplerConfig, seed: int) -> optuna.samplers.BaseSampler:
    """The GP on log-gap-warped values with local steps from the incumbent, behind
    ``DistinctProposals`` (no render spent on a repeat)."""
    warped = WarpedGPSampler(
        warp=functools.partial(log_gap, margin=config.warp_margin),
        seed=seed,
        n_startup_trials=config.startup_trials,
        deterministic_objective=True,
    )
    local = LocalSteps(
        warped, seed=seed, every=config.local_every, after=config.local_after, mode=config.local_steps
    )
    return DistinctProposals(local, seed=seed)


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


def make_sampler(config: SamplerConfig) -> optuna.samplers.BaseSampler:
    """The sampler, seeded per worker (``WorkerSeeds``), built without Optuna's ExperimentalWarning:
    TPE's ``multivariate``, GP's ``deterministic_objective`` and QMC are chosen on purpose, and the
    warning would print on every run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return WorkerSeeds(SAMPLERS.get(config.name)(config, config.seed), seed=config.seed)


def trial_seed(seed: int, trial_number: int) -> int:
    """The random seed of one trial's proposal: a hash of the study's seed and the trial's number."""
    return int(np.random.SeedSequence([seed, trial_number]).generate_state(1)[0])


def reseed(sampler: optuna.samplers.BaseSampler, seed: int) -> None:
    """Seed every random state of ``sampler`` and of the samplers it holds (TPE's and GP's random
    fallback) with ``seed``."""
    for value in vars(sampler).values():
        if isinstance(value, LazyRandomState):
            value.rng.seed(seed)
        elif isinstance(value, optuna.samplers.BaseSampler):
            reseed(value, seed)


class WorkerSeeds(SamplerWrapper):
    """``inner``, its random states seeded at this worker's first trial from (study seed, that trial's
    number), then left to run as one stream.

    Trial numbers are unique in a study, whatever worker asks: workers that start at the same instant
    on one study draw different streams (a seed per sampler, as Optuna's, gives every worker the same
    one), while one worker rerun from the same storage state proposes the same points.
    """

    def __init__(self, inner: optuna.samplers.BaseSampler, *, seed: int) -> None:
        super().__init__(inner)
        self.seed = seed
        self.seeded = False

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        if not self.seeded:
            reseed(self.inner, trial_seed(self.seed, trial.number))
            self.seeded = True
        self.inner.before_trial(study, trial)


# -- several objectives ------------------------------------------------------------------------------

MULTI_OBJECTIVE_SAMPLERS: Registry[SamplerFactory] = Registry("multi-objective sampler")
"""The samplers of studies with several objectives (Optuna's samplers that take ``directions``);
``DistinctProposals`` and ``LocalSteps`` stay single-objective (they step from one best trial)."""


def _auto_multi_objective(config: SamplerConfig, seed: int) -> optuna.samplers.BaseSampler:
    """Optuna's GP in multi-objective mode (log expected hypervolume improvement), deterministic
    objective. Chosen on the Pareto suite (``benchmarks/pareto_suite.py``, 20 generated two-target SD1
    problems): its front's hypervolume beats TPE's, NSGA-II's and random's at 15, 30 and 60 trials
    (paired, 90 % intervals above zero; BENCHMARKS.md). About 1 s per proposal on one CPU thread."""
    return _gp(config, seed)


def _nsga2(config: SamplerConfig, seed: int) -> optuna.samplers.BaseSampler:
    """NSGA-II, ``startup_trials`` (at least 2) as its population size."""
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(2, config.startup_trials))


def _nsga3(config: SamplerConfig, seed: int) -> optuna.samplers.BaseSampler:
    """NSGA-III (reference-point niching, for 3 objectives or more), ``startup_trials`` (at least 2)
    as its population size."""
    return optuna.samplers.NSGAIIISampler(seed=seed, population_size=max(2, config.startup_trials))


for _name, _factory in (
    ("auto", _auto_multi_objective),
    ("gp", _gp),
    ("tpe", _tpe),
    ("nsga2", _nsga2),
    ("nsga3", _nsga3),
    ("random", _random),
    ("qmc", _qmc),
):
    MULTI_OBJECTIVE_SAMPLERS.register(_name, _factory)


def make_multi_objective_sampler(config: SamplerConfig) -> optuna.samplers.BaseSampler:
    """The sampler of a study with several objectives, seeded per worker as ``make_sampler``'s; a
    sampler of one score only (cmaes) is a ``ConfigError``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        factory = MULTI_OBJECTIVE_SAMPLERS.get(config.name, where="sampler.name (several objectives)")
        return WorkerSeeds(factory(config, config.seed), seed=config.seed)
