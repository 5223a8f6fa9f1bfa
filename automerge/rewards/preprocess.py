"""Image preprocessing shared by the CLIP-family rewards, reproducing the reference transform of
OpenAI CLIP, ImageReward and the LAION aesthetic predictor (torchvision on PIL images) with PIL and
torch only: ``Resize(n, BICUBIC)`` (shorter side → n) → ``CenterCrop(n)`` → RGB → ``ToTensor`` →
``Normalize(mean, std)``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side = ``size`` and the longer side int(size·long/short),
    as torchvision's ``Resize(int)``."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred ``size``×``size`` crop; offsets round((d − size)/2)
    with Python's round, as torchvision's ``CenterCrop`` (the image is never smaller after resize)."""
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def clip_transform(
    images: Sequence[Image.Image],
    *,
    size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """Batch of normalised pixels, float32 (B, 3, size, size)."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return torch.stack([(_to_tensor(_resize_crop(image, size)) - mean_t) / std_t for image in images])


def _resize_crop(image: Image.Image, size: int) -> Image.Image:
    resized = image.resize(resized_size(image.width, image.height, size), Image.Resampling.BICUBIC)
    return resized.crop(center_crop_box(resized.width, resized.height, size)).convert("RGB")


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1], as torchvision's ``ToTensor`` for an 8-bit RGB image."""
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)


def image_to_unit_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float64 RGB in [0, 1], for pixel metrics."""
    array = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
