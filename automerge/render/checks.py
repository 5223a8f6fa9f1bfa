"""Image sanity checks run on every trial's renders, cheap and always on, that fail a trial instead of
letting a broken merge be scored: NaN/black images (``renderer.bad_images``), and the same picture
for different prompts, which a merge whose text conditioning collapsed renders at every seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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


class PromptCollapseCheck:
    """Within one trial, images are ``add``-ed as they are rendered (payload by payload); each is read
    into pixels once and compared with the earlier ones of the same seed, size and settings."""

    def __init__(self) -> None:
        self._seen: dict[tuple[object, ...], list[tuple[RenderedImage, tuple[str, str], np.ndarray]]] = {}

    def add(self, rendered: Sequence[RenderedImage]) -> tuple[RenderedImage, RenderedImage] | None:
        """The first earlier-or-new image and new image with different prompts (or negative prompts)
        that are the same picture (``same_picture``), else None."""
        for image in rendered:
            job = image.job
            settings = (job.seed, job.width, job.height, job.steps, job.cfg, job.scheduler, job.clip_skip)
            prompts = (_prompt_as_read(job.prompt), _prompt_as_read(job.negative_prompt))
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
