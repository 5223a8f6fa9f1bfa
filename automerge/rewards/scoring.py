"""From raw plug-in scores to trial scores: per-reward normalisation, weighted combination, and the
``ScoreResult`` that keeps every reward's raw and normalised score per image for the report.

- fixed normalisation: the manifest's ``normalize`` (affine: (raw − offset) / scale, or none);
- z-score: (raw − μ) / σ with μ, σ (population) of the raw scores on baseline images (``set_baseline``);
- arithmetic mean: Σ wᵢ·nᵢ / Σ wᵢ; geometric mean: exp(Σ wᵢ·ln nᵢ / Σ wᵢ), needs every nᵢ > 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from PIL import Image

from automerge.errors import RewardError
from automerge.registry import Registry
from automerge.rewards.base import RewardModel, check_batch
from automerge.rewards.manifest import AffineNormalize, NoNormalize


@dataclass(frozen=True)
class ComponentScores:
    """One reward's scores over a batch of images, before and after normalisation."""

    name: str
    weight: float
    raw: tuple[float, ...]
    normalized: tuple[float, ...]


@dataclass(frozen=True)
class ScoreResult:
    """Combined score per image plus every component reward's raw and normalised scores."""

    scores: tuple[float, ...]
    components: tuple[ComponentScores, ...]
    combine: str = "arithmetic"

    def mean(self) -> float:
        """Mean combined score over the images."""
        if not self.scores:
            raise RewardError("no images were scored, so there is no mean score")
        return math.fsum(self.scores) / len(self.scores)

    def per_image(self, index: int) -> dict[str, dict[str, float]]:
        """``{"raw": {name: value}, "normalized": {name: value}}`` for image ``index``."""
        return {
            "raw": {component.name: component.raw[index] for component in self.components},
            "normalized": {component.name: component.normalized[index] for component in self.components},
        }


@dataclass(frozen=True)
class ZScore:
    """normalised = (raw − mean) / std, with statistics of baseline raw scores."""

    mean: float
    std: float

    @classmethod
    def fit(cls, raw: Sequence[float], *, name: str) -> ZScore:
        """Population mean and standard deviation of ``raw``; needs two or more distinct values."""
        if len(raw) < 2:
            raise RewardError(f"reward '{name}': z-scoring needs 2 or more baseline scores, got {len(raw)}")
        mean = math.fsum(raw) / len(raw)
        std = math.sqrt(math.fsum((value - mean) ** 2 for value in raw) / len(raw))
        if not std > 0.0:
            raise RewardError(
                f"reward '{name}': baseline scores are all equal ({mean}); z-scoring needs spread, "
                "use normalize: manifest for this member"
            )
        return cls(mean=mean, std=std)

    def apply(self, raw: float) -> float:
        return (raw - self.mean) / self.std


Normalizer = AffineNormalize | NoNormalize | ZScore


def _arithmetic(values: Sequence[float], weights: Sequence[float]) -> float:
    """Σ wᵢ·xᵢ / Σ wᵢ."""
    return math.fsum(w * x for w, x in zip(weights, values, strict=True)) / math.fsum(weights)


def _geometric(values: Sequence[float], weights: Sequence[float]) -> float:
    """exp(Σ wᵢ·ln xᵢ / Σ wᵢ); the caller has checked every xᵢ > 0."""
    return math.exp(
        math.fsum(w * math.log(x) for w, x in zip(weights, values, strict=True)) / math.fsum(weights)
    )


COMBINERS: Registry[Callable[[Sequence[float], Sequence[float]], float]] = Registry("score combination")
COMBINERS.register("arithmetic", _arithmetic)
COMBINERS.register("geometric", _geometric)


def combine_components(
    components: Sequence[ComponentScores], *, combine: Literal["arithmetic", "geometric"] | str
) -> tuple[float, ...]:
    """Per image, the weighted ``combine`` mean of the components' normalised scores."""
    weights = [component.weight for component in components]
    if combine == "geometric":
        for component in components:
            for index, value in enumerate(component.normalized):
                if not value > 0.0:
                    raise RewardError(
                        f"geometric mean needs positive normalised scores, but reward '{component.name}' gave "
                        f"{value:.6g} for image {index}; use combine: arithmetic, or a normalize offset/scale "
                        "that maps its scores above 0"
                    )
    mean = COMBINERS.get(combine)
    count = len(components[0].normalized)
    return tuple(mean([component.normalized[i] for component in components], weights) for i in range(count))


def _checked_raw(model: RewardModel, raw: Sequence[float], *, expected: int) -> tuple[float, ...]:
    values = tuple(float(value) for value in raw)
    if len(values) != expected:
        raise RewardError(f"reward '{model.name}' returned {len(values)} scores for {expected} images")
    for index, value in enumerate(values):
        if not math.isfinite(value):
            raise RewardError(f"reward '{model.name}' gave a non-finite score ({value}) for image {index}")
    return values


class Reward:
    """A loaded reward model and its fixed normalisation; ``score`` gives a ``ScoreResult``."""

    def __init__(
        self, model: RewardModel, *, normalize: Normalizer | None = None, batch_size: int = 8
    ) -> None:
        self.model = model
        self.name = model.name
        self.normalize: Normalizer = normalize if normalize is not None else NoNormalize()
        self.batch_size = batch_size

    def raw_scores(
        self, images: Sequence[Image.Image], prompts: Sequence[str], *, keys: Sequence[str] | None = None
    ) -> dict[str, tuple[float, ...]]:
        """``{name: raw scores}``, scored in batches of ``batch_size`` images."""
        check_batch(images, prompts, keys, name=self.name)
        raw: list[float] = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            batch_keys = None if keys is None else list(keys[start:stop])
            raw.extend(self.model.score(list(images[start:stop]), list(prompts[start:stop]), keys=batch_keys))
        return {self.name: _checked_raw(self.model, raw, expected=len(images))}

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], *, keys: Sequence[str] | None = None
    ) -> ScoreResult:
        raw = self.raw_scores(images, prompts, keys=keys)[self.name]
        component = ComponentScores(self.name, 1.0, raw, tuple(self.normalize.apply(value) for value in raw))
        return ScoreResult(scores=component.normalized, components=(component,))


@dataclass(frozen=True)
class Member:
    """A composite member: a loaded reward, its weight and its normalisation mode."""

    reward: Reward
    weight: float
    mode: Literal["manifest", "zscore"]


class CompositeReward:
    """Several rewards combined per image; z-scored members need ``set_baseline`` before ``score``."""

    def __init__(
        self,
        members: Sequence[Member],
        *,
        name: str,
        combine: Literal["arithmetic", "geometric"] = "arithmetic",
    ) -> None:
        names = [member.reward.name for member in members]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise RewardError(
                f"composite '{name}': members share the name {duplicates[0]!r}; give each a `name`"
            )
        self.members = tuple(members)
        self.name = name
        self.combine = combine
        self._zscores: dict[str, ZScore] = {}

    def raw_scores(
        self, images: Sequence[Image.Image], prompts: Sequence[str], *, keys: Sequence[str] | None = None
    ) -> dict[str, tuple[float, ...]]:
        """``{member name: raw scores}`` for every member."""
        raw: dict[str, tuple[float, ...]] = {}
        for member in self.members:
            raw.update(member.reward.raw_scores(images, prompts, keys=keys))
        return raw

    def set_baseline(self, raw_scores: Mapping[str, Sequence[float]]) -> None:
        """Fit the z-score statistics of every ``zscore`` member from its raw baseline scores
        (e.g. ``raw_scores`` of images rendered by the unmerged base model)."""
        fitted: dict[str, ZScore] = {}
        for member in self.members:
            if member.mode != "zscore":
                continue
            if member.reward.name not in raw_scores:
                raise RewardError(
                    f"composite '{self.name}': no baseline scores for member '{member.reward.name}'"
                )
            fitted[member.reward.name] = ZScore.fit(raw_scores[member.reward.name], name=member.reward.name)
        self._zscores = fitted

    def _normalizer(self, member: Member) -> Normalizer:
        if member.mode == "manifest":
            return member.reward.normalize
        if member.reward.name not in self._zscores:
            raise RewardError(
                f"composite '{self.name}': member '{member.reward.name}' is z-scored but no baseline was set; "
                "call set_baseline with raw scores of baseline images first"
            )
        return self._zscores[member.reward.name]

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], *, keys: Sequence[str] | None = None
    ) -> ScoreResult:
        normalizers = [self._normalizer(member) for member in self.members]  # fail before any scoring
        raw = self.raw_scores(images, prompts, keys=keys)
        components = tuple(
            ComponentScores(
                member.reward.name,
                member.weight,
                raw[member.reward.name],
                tuple(normalizer.apply(value) for value in raw[member.reward.name]),
            )
            for member, normalizer in zip(self.members, normalizers, strict=True)
        )
        return ScoreResult(combine_components(components, combine=self.combine), components, self.combine)
