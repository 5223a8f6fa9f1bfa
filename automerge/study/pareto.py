"""Several objectives: the Pareto front, its hypervolume and the rules that pick one point of it.

Pure functions on arrays of scores, one row per trial and one column per objective, every column
in the maximize sense (a minimized objective is negated first, ``maximized``). Reading trials from
a study is ``records``'s (``front_trials``, ``pick_trial``); stopping on the hypervolume is
``stopping``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from optuna._hypervolume import compute_hypervolume  # exact: 2-D sweep, 3-D, WFG beyond

from automerge.errors import ConfigError
from automerge.registry import Registry


def maximized(values: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    """(n, k) scores with each minimized column negated, so that higher is better everywhere."""
    signs = np.where(np.asarray(maximize, dtype=bool), 1.0, -1.0)
    return np.asarray(values, dtype=float).reshape(-1, len(signs)) * signs


def dominates(p: np.ndarray, q: np.ndarray) -> bool:
    """p ≥ q in every objective and > in one (maximize)."""
    return bool(np.all(p >= q) and np.any(p > q))


def dominated_by(points: np.ndarray, p: np.ndarray) -> np.ndarray:
    """For each row q of ``points``, whether q dominates ``p``."""
    return np.all(points >= p, axis=1) & np.any(points > p, axis=1)


def front_mask(points: np.ndarray) -> np.ndarray:
    """Which rows no other row dominates (maximize); equal rows are all on the front."""
    points = np.asarray(points, dtype=float)
    return np.array([not dominated_by(points, p).any() for p in points], dtype=bool)


@dataclass(frozen=True)
class Scale:
    """Per objective, (v − low) / span: ``low`` maps to 0 and ``low + span`` to 1."""

    low: np.ndarray
    span: np.ndarray

    def apply(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, dtype=float) - self.low) / self.span


def range_scale(points: np.ndarray) -> Scale:
    """The scale that maps the points' range of each objective to [0, 1]; an objective on which
    they all agree keeps span 1 (it decides nothing)."""
    points = np.asarray(points, dtype=float)
    low, high = points.min(axis=0), points.max(axis=0)
    span = high - low
    return Scale(low, np.where(span > 0, span, 1.0))


def hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """The volume dominated by ``points`` and bounded by ``reference`` (maximize): Lebesgue measure of
    ∪ [reference, p]; points not beyond the reference in every objective add nothing."""
    points = np.asarray(points, dtype=float)
    beyond = points[np.all(points > reference, axis=1)] if len(points) else points
    if len(beyond) == 0:
        return 0.0
    return float(compute_hypervolume(-beyond, -np.asarray(reference, dtype=float)))


def hypervolume_trace(points: np.ndarray, scale: Scale) -> list[float]:
    """The hypervolume of the first i + 1 points for each i, each objective put through ``scale``
    and the reference point at 0 (the scale's ``low``). Recomputed only when a point joins the front."""
    scaled = scale.apply(points)
    reference = np.zeros(scaled.shape[1])
    front = np.empty((0, scaled.shape[1]))
    trace: list[float] = []
    current = 0.0
    for point in scaled:
        if not (dominated_by(front, point).any() or np.all(front == point, axis=1).any()):
            kept = ~(np.all(point >= front, axis=1) & np.any(point > front, axis=1))  # those it dominates go
            front = np.vstack([front[kept], point])
            current = hypervolume(front, reference)
        trace.append(current)
    return trace


# -- picking one point of the front -----------------------------------------------------------------


@dataclass(frozen=True)
class PickRule:
    """How ``export`` picks one point of the front: ``knee``, or ``weighted`` with one weight per
    objective."""

    name: str
    weights: tuple[float, ...] = ()

    @property
    def text(self) -> str:
        """The rule as ``--pick`` takes it: ``knee``, ``weighted:0.7,0.3``."""
        return self.name + (":" + ",".join(f"{w:g}" for w in self.weights) if self.weights else "")


KNEE = PickRule("knee")

PickFunction = Callable[[np.ndarray, PickRule], tuple[int, str]]
"""(front points normalised by the front's range, the rule) → (the row picked, why, in words)."""
PICK_RULES: Registry[PickFunction] = Registry("pick rule")


@PICK_RULES.decorator("knee")
def knee(normalised: np.ndarray, rule: PickRule) -> tuple[int, str]:
    """argmin ‖1 − n‖: the point nearest the ideal point (the best of each objective), each objective
    normalised by the front's range; the first on ties."""
    distance = np.sqrt(((1.0 - normalised) ** 2).sum(axis=1))
    row = int(np.argmin(distance))
    return row, f"the knee point, nearest the ideal point (distance {distance[row]:.3g})"


@PICK_RULES.decorator("weighted")
def weighted(normalised: np.ndarray, rule: PickRule) -> tuple[int, str]:
    """argmax Σ wᵢ·nᵢ of the objectives normalised by the front's range; the first on ties."""
    total = normalised @ np.asarray(rule.weights, dtype=float)
    row = int(np.argmax(total))
    weights = ", ".join(f"{w:g}" for w in rule.weights)
    return row, f"the highest weighted sum, weights {weights} ({total[row]:.3g})"


def pick(front: np.ndarray, rule: PickRule) -> tuple[int, str]:
    """The row of ``front`` (maximize) that ``rule`` picks, and why; objectives normalised by the
    front's range first, so that no objective counts more for its units."""
    front = np.asarray(front, dtype=float)
    if rule.weights and len(rule.weights) != front.shape[1]:
        raise ConfigError(f"--pick {rule.text}: give one weight per objective ({front.shape[1]})")
    return PICK_RULES.get(rule.name, where="--pick")(range_scale(front).apply(front), rule)


def parse_pick(text: str) -> PickRule:
    """``knee`` or ``weighted:W1,W2,…`` (weights ≥ 0, not all 0) → a ``PickRule``."""
    name, _, rest = text.strip().partition(":")
    PICK_RULES.get(name, where=f"--pick {text}")
    if name == "knee":
        if rest:
            raise ConfigError(f"--pick {text}: knee takes no weights; use --pick knee")
        return KNEE
    try:
        weights = tuple(float(part) for part in rest.split(","))
    except ValueError:
        raise ConfigError(
            f"--pick {text}: weights are numbers separated by commas, e.g. weighted:0.7,0.3"
        ) from None
    if not rest or any(not np.isfinite(w) or w < 0 for w in weights) or not any(weights):
        raise ConfigError(
            f"--pick {text}: give one weight ≥ 0 per objective, not all 0, e.g. weighted:0.7,0.3"
        )
    return PickRule(name, weights)
