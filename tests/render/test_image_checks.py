"""Image sanity checks that fail a trial instead of scoring it: the same picture for different prompts
(a merge whose text conditioning collapsed; issue 18: users lost a night's run to it), and images far
noisier, smoother, more or less saturated than the baselines' renders of the same prompts and seeds."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from automerge.render.checks import (
    NEAR_DUPLICATE_FLOOR,
    NEAR_DUPLICATE_MARGIN,
    ImageStats,
    image_stats,
    near_duplicate,
    near_duplicate_threshold,
    nearest_prompts,
    same_picture,
    same_picture_for_different_prompts,
    stats_outlier,
)
from automerge.render.payload import RenderJob
from automerge.render.renderer import RenderedImage


def _rendered(prompt: str, seed: int, pixels: np.ndarray, *, width: int = 8) -> RenderedImage:
    job = RenderJob(
        key=f"{prompt[:3]}-{seed}",
        item=0,
        seed=seed,
        prompt=prompt,
        negative_prompt="",
        steps=4,
        cfg=5.0,
        width=width,
        height=8,
        scheduler="euler",
        clip_skip=1,
        weight=1.0,
    )
    return RenderedImage(job, Image.fromarray(pixels.astype(np.uint8)), upcast_vae=False)


RNG = np.random.default_rng(0)
PICTURE = RNG.integers(0, 250, size=(8, 8, 3))


def test_two_prompts_rendering_the_same_picture_at_one_seed_are_found() -> None:
    first, second = _rendered("a red house", 1, PICTURE), _rendered("a blue boat", 1, PICTURE)
    assert same_picture_for_different_prompts([first, second]) == (first, second)


def test_a_rounding_flip_of_one_level_in_few_values_is_still_the_same_picture() -> None:
    big = RNG.integers(0, 250, size=(64, 64, 3))
    flipped = big.copy()
    flipped.flat[:12] += 1  # 12 of 12,288 values (0.1 %)
    assert same_picture(big, flipped)
    flipped.flat[:13] += 1  # 13 values two levels off, or just over 0.1 % one level off: another picture
    assert not same_picture(big, flipped)
    more = big.copy()
    more.flat[:13] += 1
    assert not same_picture(big, more)


@pytest.mark.parametrize(
    "other",
    [
        _rendered("a blue boat", 1, PICTURE + 1),  # one level apart everywhere: another picture
        _rendered("a blue boat", 2, PICTURE),  # another seed: a fixed picture is fine
        _rendered("A  red house ", 1, PICTURE),  # the same prompt, as the tokenizer reads it
        _rendered("a blue boat", 1, np.zeros((8, 16, 3)), width=16),  # another size
    ],
)
def test_other_pictures_seeds_prompts_or_sizes_are_not_collapse(other: RenderedImage) -> None:
    assert same_picture_for_different_prompts([_rendered("a red house", 1, PICTURE), other]) is None


def test_one_differing_pixel_is_enough_to_tell_pictures_apart() -> None:
    changed = PICTURE.copy()
    changed[3, 4, 1] += 5
    images = [_rendered("a red house", 1, PICTURE), _rendered("a blue boat", 1, changed)]
    assert same_picture_for_different_prompts(images) is None


# -- near-duplicates across prompts, against the baselines' nearest pair -------------------------------


def _pair(rendered: RenderedImage) -> tuple[RenderJob, Image.Image]:
    return rendered.job, rendered.image


def test_the_nearest_pair_of_different_prompts_at_one_seed_is_found_with_its_distance() -> None:
    big = RNG.integers(0, 250, size=(64, 64, 3))
    images = [
        _rendered("a red house", 1, big, width=64),
        _rendered("a blue boat", 1, big + 4, width=64),  # 4 levels apart: d = 4
        _rendered("a green tree", 1, big + 2, width=64),  # 2 from the house: the nearest
        _rendered("a blue boat", 2, big, width=64),  # another seed: not compared
    ]
    nearest = nearest_prompts([_pair(image) for image in images])
    assert nearest is not None
    assert (nearest.first.prompt, nearest.second.prompt) == ("a red house", "a green tree")
    assert nearest.distance == pytest.approx(2.0, abs=0.01)


def test_one_prompt_or_each_prompt_at_its_own_seed_skips_the_check() -> None:
    one_prompt = [_rendered("a red house", seed, PICTURE) for seed in (1, 2)]
    assert nearest_prompts([_pair(image) for image in one_prompt]) is None
    own_seeds = [_rendered("a red house", 1, PICTURE), _rendered("a blue boat", 2, PICTURE)]
    assert nearest_prompts([_pair(image) for image in own_seeds]) is None
    assert near_duplicate(None, 1.0) is None


def test_the_threshold_is_the_baselines_nearest_over_the_margin_or_the_floor_without_baselines() -> None:
    assert near_duplicate_threshold([8.0, 6.0, 9.0]) == 6.0 / NEAR_DUPLICATE_MARGIN
    assert near_duplicate_threshold([]) == NEAR_DUPLICATE_FLOOR


def test_a_pair_below_the_threshold_is_named_with_its_prompts_and_distance() -> None:
    big = RNG.integers(0, 250, size=(64, 64, 3))
    images = [_rendered("a red house", 1, big, width=64), _rendered("a blue boat", 1, big + 1, width=64)]
    nearest = nearest_prompts([_pair(image) for image in images])
    assert near_duplicate(nearest, 1.5) == (
        "images a r-1 and a b-1 are near-duplicates for different prompts ('a red house', 'a blue boat'; "
        "seed 1): distance 1 grey levels, below 1.5 (the baselines' nearest / 4): the merge ignores the prompt"
    )
    assert near_duplicate(nearest, 1.0) is None


# -- noise and saturation against the baselines ------------------------------------------------------


def _scene(seed: int) -> Image.Image:
    """A smooth coloured picture with some texture (a render's statistics, roughly)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:64, 0:64] / 64.0
    base = np.stack([0.5 + 0.3 * np.sin(6 * x + seed), 0.4 + 0.3 * y, 0.3 + 0.2 * np.cos(5 * y)], axis=2)
    return Image.fromarray(np.clip((base + rng.normal(0, 0.02, base.shape)) * 255, 0, 255).astype(np.uint8))


def _noisy(image: Image.Image, sigma: float) -> Image.Image:
    pixels = np.asarray(image).astype(np.float32) + np.random.default_rng(1).normal(0, sigma, (64, 64, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


SCENES = {f"k{i}": _scene(i) for i in range(4)}
BASELINES = [
    {key: image_stats(image).as_list() for key, image in SCENES.items()},
    {key: image_stats(_noisy(image, 2)).as_list() for key, image in SCENES.items()},
]


def test_image_stats_measure_high_frequency_energy_and_chroma() -> None:
    flat = Image.new("RGB", (16, 16), (200, 40, 40))
    assert image_stats(flat) == ImageStats(noise=0.0, saturation=pytest.approx(160 / 255))
    grey_noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)).convert(
        "RGB"
    )
    noisy = image_stats(grey_noise)
    assert noisy.saturation == 0.0 and noisy.noise > 40


@pytest.mark.parametrize(
    ("change", "what"),
    [
        (lambda im: _noisy(im, 25), "noise"),
        (lambda im: im.filter(ImageFilter.GaussianBlur(2)), "noise"),
        (lambda im: ImageEnhance.Color(im).enhance(2.5), "saturation"),
        (lambda im: im.convert("L").convert("RGB"), "saturation"),
    ],
)
def test_images_far_outside_the_baselines_range_are_named(change, what) -> None:
    stats = {key: image_stats(change(image)) for key, image in SCENES.items()}
    reason = stats_outlier(stats, BASELINES)
    assert reason is not None and reason.startswith(f"images out of the baselines' range: {what} ")


def test_images_within_or_near_the_baselines_range_pass() -> None:
    between = {key: image_stats(_noisy(image, 1)) for key, image in SCENES.items()}
    assert stats_outlier(between, BASELINES) is None
    one_outlier = dict(between, k0=image_stats(_noisy(SCENES["k0"], 60)))  # the median decides
    assert stats_outlier(one_outlier, BASELINES) is None
    assert stats_outlier({k: image_stats(_noisy(im, 25)) for k, im in SCENES.items()}, BASELINES[:1]) is None
