"""The search suite's statistics: gap closed, trials to a level, medians with bootstrap confidence
intervals over runs, and best-so-far curves drawn as PNG (Pillow only, no plotting library).

gap closed after n trials = (best value in the first n − value of uniform 0.5) / (optimum − value of
uniform 0.5), clipped to [0, 1]; the optimum is the secret's own value (0 for a negative MSE).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw

BOOTSTRAP_REPS = 2000
CONFIDENCE = 0.90


def best_so_far(values: Sequence[float | None]) -> list[float]:
    """The best value up to each trial (None: a trial without a value, e.g. pruned after a preview)."""
    running, best = [], -math.inf
    for value in values:
        best = best if value is None else max(best, value)
        running.append(best)
    return running


def gap_closed(best: float, *, optimum: float, midpoint: float) -> float:
    """The fraction of the uniform-0.5 → optimum gap that ``best`` closed, in [0, 1]."""
    gap = optimum - midpoint
    if gap <= 0:
        return 1.0  # uniform 0.5 is already optimal: nothing to close
    return min(1.0, max(0.0, (best - midpoint) / gap))


def gap_curve(values: Sequence[float | None], *, optimum: float, midpoint: float) -> list[float]:
    return [gap_closed(b, optimum=optimum, midpoint=midpoint) for b in best_so_far(values)]


def trials_to(curve: Sequence[float], level: float) -> float:
    """The first trial count (1-based) at which ``curve`` reaches ``level``; inf when it never does."""
    return next((float(i + 1) for i, value in enumerate(curve) if value >= level - 1e-12), math.inf)


def bootstrap_median(values: Sequence[float], *, seed: int = 0) -> tuple[float, float, float]:
    """(median, low, high): the median and its 90 % percentile-bootstrap interval over ``values``."""
    return _bootstrap(values, statistics.median, seed=seed)


def bootstrap_mean(values: Sequence[float], *, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its 90 % percentile-bootstrap interval over ``values``."""
    return _bootstrap(values, statistics.fmean, seed=seed)


def _bootstrap(
    values: Sequence[float], statistic: Callable[[Sequence[float]], float], *, seed: int
) -> tuple[float, float, float]:
    rng = random.Random(seed)
    estimates = sorted(statistic(rng.choices(values, k=len(values))) for _ in range(BOOTSTRAP_REPS))
    tail = (1 - CONFIDENCE) / 2
    low = estimates[int(tail * BOOTSTRAP_REPS)]
    high = estimates[min(BOOTSTRAP_REPS - 1, int((1 - tail) * BOOTSTRAP_REPS))]
    return statistic(values), low, high


def interval_text(estimate: tuple[float, float, float], fmt: Callable[[float], str]) -> str:
    median, low, high = estimate
    return f"{fmt(median)} [{fmt(low)}, {fmt(high)}]"


# -- plots ------------------------------------------------------------------------------------------

_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def plot_curves(
    path: Path,
    curves: Mapping[str, Sequence[Sequence[float]]],
    *,
    title: str,
    size: tuple[int, int] = (760, 420),
) -> None:
    """Median best-so-far gap closed per strategy (line) with its 90 % bootstrap band (shaded),
    every 5th trial; x = trials (log scale), y = gap closed 0–1."""
    width, height = size
    left, right, top, bottom = 56, 150, 30, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image, "RGBA")
    trials = max(len(c) for runs in curves.values() for c in runs)

    def x(n: int) -> float:
        return left + (width - left - right) * math.log(n) / math.log(trials)

    def y(v: float) -> float:
        return top + (height - top - bottom) * (1 - v)

    for level in (0.0, 0.25, 0.5, 0.75, 0.9, 1.0):
        draw.line([(left, y(level)), (width - right, y(level))], fill="#e4e8ec")
        draw.text((8, y(level) - 6), f"{level:.2f}", fill="#444")
    for n in (1, 10, 25, 50, 100, 200):
        if n <= trials:
            draw.line([(x(n), top), (x(n), height - bottom)], fill="#e4e8ec")
            draw.text((x(n) - 8, height - bottom + 6), str(n), fill="#444")
    draw.text((left, 8), title, fill="#111")
    for index, (name, runs) in enumerate(curves.items()):
        colour = _COLOURS[index % len(_COLOURS)]
        steps = [n for n in range(1, trials + 1) if n == 1 or n % 5 == 0 or n == trials]
        bands = [bootstrap_median([run[min(n, len(run)) - 1] for run in runs], seed=n) for n in steps]
        upper = [(x(n), y(b[2])) for n, b in zip(steps, bands, strict=True)]
        lower = [(x(n), y(b[1])) for n, b in zip(steps, bands, strict=True)]
        draw.polygon(upper + lower[::-1], fill=_rgba(colour, 48))
        draw.line([(x(n), y(b[0])) for n, b in zip(steps, bands, strict=True)], fill=colour, width=2)
        draw.text((width - right + 10, top + 16 * index), name, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _rgba(colour: str, alpha: int) -> tuple[int, int, int, int]:
    return (int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16), alpha)
