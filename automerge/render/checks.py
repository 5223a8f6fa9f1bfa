"""Image sanity checks run on every trial's renders, cheap and always on, that fail a trial instead of
letting a broken merge be scored: NaN/black images (``renderer.bad_images``); the same picture for
different prompts, which a merge whose text conditioning collapsed renders at every seed, and nearly
the same picture (``nearest_prompts``, ``near_duplicate``: closer than the baselines' renders of the
prompts by a margin); and images far noisier, smoother, more or less saturated than the baselines'
renders of the same prompts and seeds (``ImageStats``, ``stats_outlier``), which reward models are
known to score too well.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from automerge.render.payload import RenderJob
from automerge.render.renderer import RenderedImage

SAME_PICTURE_LEVELS = 1
SAME_PICTURE_SHARE = 0.001
"""Two 8-bit images are the same picture when no channel value differs by more than one level and at
most 0.1 % differ at all (rounding flips of one computation; a working text encoder moves more, even
on the tiny test models, whose prompts differ by one level in ~4 % of the values)."""


def same_picture(first: np.ndarray, second: np.ndarray) -> bool:
    """Whether two uint8-valued arrays of one shape are the same picture (see ``SAME_PICTURE_SHARE``)."""
    difference = np.abs(first.astype(np.int16) - second.astype(np.int16))
    return bool(difference.max() <= SAME_PICTURE_LEVELS and (difference > 0).mean() <= SAME_PICTURE_SHARE)


def _prompt_as_read(text: str) -> str:
    """The prompt as CLIP's tokenizer reads it: case and runs of white space do not count."""
    return " ".join(text.lower().split())


def _compared(job: RenderJob) -> tuple[tuple[object, ...], tuple[str, str]]:
    """(settings, prompts as read) of a render: images are compared across prompts within one
    settings group (seed, size, steps, cfg, scheduler, clip skip)."""
    settings = (job.seed, job.width, job.height, job.steps, job.cfg, job.scheduler, job.clip_skip)
    return settings, (_prompt_as_read(job.prompt), _prompt_as_read(job.negative_prompt))


class PromptCollapseCheck:
    """Within one trial, images are ``add``-ed as they are rendered (payload by payload); each is read
    into pixels once and compared with the earlier ones of the same seed, size and settings."""

    def __init__(self) -> None:
        self._seen: dict[tuple[object, ...], list[tuple[RenderedImage, tuple[str, str], np.ndarray]]] = {}

    def add(self, rendered: Sequence[RenderedImage]) -> tuple[RenderedImage, RenderedImage] | None:
        """The first earlier-or-new image and new image with different prompts (or negative prompts)
        that are the same picture (``same_picture``), else None."""
        for image in rendered:
            settings, prompts = _compared(image.job)
            pixels = np.asarray(image.image.convert("RGB"))
            group = self._seen.setdefault(settings, [])
            for other, other_prompts, other_pixels in group:
                if other_prompts != prompts and same_picture(pixels, other_pixels):
                    return other, image
            group.append((image, prompts, pixels))
        return None


def same_picture_for_different_prompts(
    rendered: Sequence[RenderedImage],
) -> tuple[RenderedImage, RenderedImage] | None:
    """The first two of ``rendered`` with different prompts but the same seed, size and settings that
    are the same picture, else None."""
    return PromptCollapseCheck().add(rendered)


THUMBNAIL_SIZE = 32
NEAR_DUPLICATE_MARGIN = 4.0
NEAR_DUPLICATE_FLOOR = 0.01
"""Two images of different prompts at one seed are near-duplicates when their distance
(``thumbnail_distance``) is below the baselines' smallest such distance / ``NEAR_DUPLICATE_MARGIN``,
or below ``NEAR_DUPLICATE_FLOOR`` grey levels while no baseline has rendered yet (the tiny test
models' prompts sit ~0.1 level apart; a collapsed merge's at 0)."""


def thumbnail(image: Image.Image) -> np.ndarray:
    """A ``THUMBNAIL_SIZE``² grey copy (levels 0–255, box-filtered) of an image."""
    small = image.convert("L").resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32)


def thumbnail_distance(first: np.ndarray, second: np.ndarray) -> float:
    """d = mean |t₁ − t₂| over two thumbnails, in grey levels."""
    return float(np.abs(first - second).mean())


@dataclass(frozen=True)
class NearestPrompts:
    """The two images of different prompts at one seed and size that are closest (``distance``)."""

    distance: float
    first: RenderJob
    second: RenderJob


def nearest_prompts(images: Sequence[tuple[RenderJob, Image.Image]]) -> NearestPrompts | None:
    """The closest pair of images with different prompts but the same seed, size and settings, None
    when there is no such pair (one prompt, or each prompt at its own seeds)."""
    groups: dict[tuple[object, ...], list[tuple[RenderJob, tuple[str, str], np.ndarray]]] = {}
    nearest: NearestPrompts | None = None
    for job, image in images:
        settings, prompts = _compared(job)
        small = thumbnail(image)
        group = groups.setdefault(settings, [])
        for other, other_prompts, other_small in group:
            distance = thumbnail_distance(small, other_small)
            if other_prompts != prompts and (nearest is None or distance < nearest.distance):
                nearest = NearestPrompts(distance, other, job)
        group.append((job, prompts, small))
    return nearest


def near_duplicate_threshold(baseline_distances: Sequence[float]) -> float:
    """min(baselines' nearest distances) / ``NEAR_DUPLICATE_MARGIN``; ``NEAR_DUPLICATE_FLOOR`` without
    baselines."""
    if not baseline_distances:
        return NEAR_DUPLICATE_FLOOR
    return min(baseline_distances) / NEAR_DUPLICATE_MARGIN


def near_duplicate(nearest: NearestPrompts | None, threshold: float) -> str | None:
    """Why a trial's renders are near-duplicates across prompts (distance below ``threshold``), else None."""
    if nearest is None or nearest.distance >= threshold:
        return None
    first, second = nearest.first, nearest.second
    return (
        f"images {first.key} and {second.key} are near-duplicates for different prompts "
        f"({first.prompt!r}, {second.prompt!r}; seed {first.seed}): distance {nearest.distance:.3g} grey "
        f"levels, below {threshold:.3g} (the baselines' nearest / {NEAR_DUPLICATE_MARGIN:g}): the merge "
        "ignores the prompt"
    )


@dataclass(frozen=True)
class ImageStats:
    """Cheap per-image statistics of a render (8-bit RGB).

    ``noise``: mean |g − box3(g)| of the grey levels g (0–255) against their 3×3 mean: high-frequency
    energy, in levels. ``saturation``: mean (max − min) over the channels of each pixel, / 255 (0–1).
    """

    noise: float
    saturation: float

    def as_list(self) -> list[float]:
        return [self.noise, self.saturation]


STAT_NAMES = ("noise", "saturation")


def image_stats(image: Image.Image) -> ImageStats:
    """``ImageStats`` of one image."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    grey = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    padded = np.pad(grey, 1, mode="edge")
    height, width = grey.shape
    box = sum(padded[i : i + height, j : j + width] for i in range(3) for j in range(3)) / 9.0
    chroma = pixels.max(axis=2) - pixels.min(axis=2)
    return ImageStats(noise=float(np.abs(grey - box).mean()), saturation=float(chroma.mean() / 255.0))


STATS_TOLERANCE = 1.0
STATS_FLOOR = 0.25
"""An image is out of the baselines' range when a statistic lies beyond the range of the baselines'
images of the same prompt and seed by more than ``STATS_TOLERANCE`` × max(the range's width,
``STATS_FLOOR`` × the range's middle); a trial fails when that holds for the median of its images."""


def stats_outlier(
    stats: Mapping[str, ImageStats], baselines: Sequence[Mapping[str, Sequence[float]]]
) -> str | None:
    """Why a trial's images are out of the baselines' range (``STATS_TOLERANCE``), None when they are
    not or when fewer than two baselines rendered its image keys. ``baselines``: each baseline
    trial's stats by image key, as ``ImageStats.as_list`` stored them."""
    for index, name in enumerate(STAT_NAMES):
        excess = []
        for key, value in stats.items():
            seen = [float(baseline[key][index]) for baseline in baselines if key in baseline]
            if len(seen) < 2:
                continue
            low, high = min(seen), max(seen)
            allowed = STATS_TOLERANCE * max(high - low, STATS_FLOOR * (high + low) / 2, 1e-6)
            mine = value.as_list()[index]
            excess.append(max(mine - high, low - mine, 0.0) / allowed)
        if excess and statistics.median(excess) > 1.0:
            middle = statistics.median(
                value.as_list()[index] for key, value in stats.items() if any(key in b for b in baselines)
            )
            direction = (
                "above"
                if middle
                > statistics.median(float(b[key][index]) for b in baselines for key in stats if key in b)
                else "below"
            )
            return (
                f"images out of the baselines' range: {name} {middle:.3g} (median over the images) is "
                f"{direction} what the baselines render for the same prompts and seeds, by more than "
                f"{STATS_TOLERANCE:g}× their spread"
            )
    return None
