"""Similarity to a reference image of the same (item, seed) key — e.g. a target rendered once.

- ``mse``:  score = −mean((x − y)²) over RGB pixels in [0, 1] (higher is better, 0 = identical);
- ``ssim``: score = mean SSIM over RGB channels (Wang et al. 2004), Gaussian window (11, σ 1.5),
  K1 = 0.01, K2 = 0.03, data range 1, valid convolution (no padding); 1 = identical.

References come from a folder of ``<key>.png`` (``options.directory``) or from memory
(``ReferenceReward.from_images`` / ``RewardContext.reference_images``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from pydantic import Field

from automerge.config import FileRef, Schema
from automerge.errors import RewardError
from automerge.registry import Registry
from automerge.rewards.base import LoadRequest, RewardPlugin, check_batch, register_reward
from automerge.rewards.preprocess import image_to_unit_tensor

Metric = Callable[[torch.Tensor, torch.Tensor], float]


def negative_mse(x: torch.Tensor, y: torch.Tensor) -> float:
    """−mean((x − y)²) of two (C, H, W) images in [0, 1]."""
    return -float(torch.mean((x - y) ** 2))


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """1-D Gaussian weights exp(−d²/2σ²), d = −(size−1)/2 … (size−1)/2, summing to 1 (float64)."""
    distance = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    weights = torch.exp(-(distance**2) / (2.0 * sigma**2))
    return weights / weights.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, *, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of two (C, H, W) float64 images in [0, 1]:
    ((2μxμy + C1)(2σxy + C2)) / ((μx² + μy² + C1)(σx² + σy² + C2)), C1 = 0.01², C2 = 0.03²."""
    channels, height, width = x.shape
    if min(height, width) < window:
        raise RewardError(f"ssim: images of {width}×{height} px are smaller than the {window}-px window")
    g = gaussian_window(window, sigma).to(x.dtype)
    kernel_h = g.view(1, 1, 1, window).expand(channels, 1, 1, window)
    kernel_v = g.view(1, 1, window, 1).expand(channels, 1, window, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid region: (1, C, H−w+1, W−w+1)
        return F.conv2d(F.conv2d(t.unsqueeze(0), kernel_h, groups=channels), kernel_v, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov_xy = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    )
    return float(ssim_map.mean())


METRICS: Registry[Metric] = Registry("reference metric")
METRICS.register("mse", negative_mse)
METRICS.register("ssim", ssim)


class ReferenceOptions(Schema):
    """``metric``: mse or ssim; ``directory``: folder of ``<key>.png`` reference images."""

    metric: Literal["mse", "ssim"] = "ssim"
    directory: FileRef | None = None
    extension: str = Field(default=".png", pattern=r"^\.[A-Za-z0-9]+$")


@register_reward("reference")
class ReferenceReward(RewardPlugin):
    """Similarity of each image to the reference image of its key (no weights)."""

    Options = ReferenceOptions
    uses_prompts: ClassVar[bool] = False

    def __init__(
        self,
        *,
        metric: Literal["mse", "ssim"] = "ssim",
        directory: Path | None = None,
        images: Mapping[str, Image.Image] | None = None,
        extension: str = ".png",
        name: str = "reference",
    ) -> None:
        self.metric_name = metric
        self.metric = METRICS.get(metric)
        self.directory = directory
        self.extension = extension
        self.name = name
        self._references = {key: image_to_unit_tensor(image) for key, image in (images or {}).items()}

    @classmethod
    def from_images(
        cls,
        images: Mapping[str, Image.Image],
        *,
        metric: Literal["mse", "ssim"] = "ssim",
        name: str = "reference",
    ) -> ReferenceReward:
        """References held in memory, key → image (the demo renders its target once)."""
        return cls(metric=metric, images=images, name=name)

    @classmethod
    def load(cls, request: LoadRequest) -> ReferenceReward:
        options = request.options
        assert isinstance(options, ReferenceOptions)
        if options.directory is None and not request.context.reference_images:
            raise request.fail(
                "the reference reward needs options.directory (a folder of <key>.png) or reference images given in memory"
            )
        if options.directory is not None and not options.directory.is_dir():
            raise request.fail(f"options.directory: folder {options.directory} not found")
        return cls(
            metric=options.metric,
            directory=options.directory,
            images=request.context.reference_images,
            extension=options.extension,
            name=request.manifest.display_name(request.manifest_path),
        )

    def score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], *, keys: Sequence[str] | None = None
    ) -> list[float]:
        """metric(image_i, reference[key_i]) per image."""
        check_batch(images, prompts, keys, name=self.name)
        if keys is None:
            raise RewardError(
                f"reward '{self.name}' compares each image with the reference of its key: pass keys="
            )
        scores = []
        for image, key in zip(images, keys, strict=True):
            reference = self._reference(key)
            candidate = image_to_unit_tensor(image)
            if candidate.shape != reference.shape:
                raise RewardError(
                    f"reward '{self.name}': image for key '{key}' is {_size(candidate)} px but its reference is {_size(reference)} px"
                )
            scores.append(self.metric(candidate, reference))
        return scores

    def _reference(self, key: str) -> torch.Tensor:
        if key not in self._references:
            self._references[key] = self._read(key)
        return self._references[key]

    def _read(self, key: str) -> torch.Tensor:
        relative = PurePosixPath(key + self.extension)
        if self.directory is None:
            raise RewardError(f"reward '{self.name}': no reference image for key '{key}'")
        if relative.is_absolute() or ".." in relative.parts:
            raise RewardError(f"reward '{self.name}': key '{key}' is not a relative name")
        path = self.directory / relative
        if not path.is_file():
            raise RewardError(f"reward '{self.name}': no reference image {path} for key '{key}'")
        try:
            with Image.open(path) as image:
                return image_to_unit_tensor(image)
        except (OSError, UnidentifiedImageError) as error:
            raise RewardError(f"{path}: cannot be read as an image ({error})") from None


def _size(image: torch.Tensor) -> str:
    return f"{image.shape[2]}×{image.shape[1]}"
