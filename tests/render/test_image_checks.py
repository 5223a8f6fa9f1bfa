"""Image sanity checks that fail a trial instead of scoring it: the same picture for different prompts
(a merge whose text conditioning collapsed; issue 18: users lost a night's run to it)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from automerge.render.checks import same_picture, same_picture_for_different_prompts
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
