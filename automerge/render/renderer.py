"""Deterministic rendering of payload jobs, and PNG files that carry their own settings.

Noise depends on the seed alone (A1111 with "RNG source: CPU"): each image's initial latents are drawn
from ``torch.Generator("cpu").manual_seed(seed)``, and the same generator then feeds the sampler's
per-step noise (ancestral samplers), so an image's noise does not depend on which batch it is rendered
in (its arithmetic may, in a last bit, on a CPU: the study renders references and trials in the same
groups, ``study.runtime.payload_groups``).
diffusers scales the latents we pass by ``scheduler.init_noise_sigma`` (``prepare_latents``): we pass
unit-variance noise. Latents are decoded here, not in the pipeline, so that a NaN or black image
(fp16 VAE overflow) is caught and re-decoded with the VAE in fp32, or reported; never returned.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from PIL.PngImagePlugin import PngInfo

from automerge.errors import RenderError
from automerge.files import atomic_writer
from automerge.render.payload import RenderJob, RenderSettings
from automerge.render.pipeline import prompt_inputs
from automerge.render.schedulers import make_scheduler


@dataclass(frozen=True)
class RenderedImage:
    """One rendered job; ``upcast_vae``: decoded by the fp32 fallback after the VAE's dtype failed."""

    job: RenderJob
    image: PIL.Image.Image
    upcast_vae: bool


def initial_noise(seed: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Generator]:
    """Unit normal latents (fp32, CPU) from ``seed``, and the generator, advanced past them."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32), generator


def batches(jobs: Sequence[RenderJob], batch_size: int) -> list[list[int]]:
    """Job indices grouped by shared ``RenderSettings`` (first-seen order), in chunks of ``batch_size``."""
    groups: dict[RenderSettings, list[int]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault(job.settings, []).append(index)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


class Renderer:
    """Renders ``RenderJob``s with a resident pipeline, in batches of jobs with equal settings."""

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        *,
        batch_size: int = 4,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        """``batch_size``: images per pipeline call (≥ 1; ``RenderConfig`` checks it)."""
        self.pipeline = pipeline
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.dtype = dtype
        self._prediction_type: str = pipeline.scheduler.config.prediction_type

    def render(self, jobs: Sequence[RenderJob]) -> list[RenderedImage]:
        """Every job's image, in the order of ``jobs``."""
        self._check(jobs)
        rendered: dict[int, RenderedImage] = {}
        for indices in batches(jobs, self.batch_size):
            batch = [jobs[i] for i in indices]
            rendered.update(zip(indices, self._render_batch(batch), strict=True))
        return [rendered[i] for i in range(len(jobs))]

    def _check(self, jobs: Sequence[RenderJob]) -> None:
        """Check what the pipeline cannot take before any compute."""
        encoders = [self.pipeline.text_encoder, getattr(self.pipeline, "text_encoder_2", None)]
        layers = min(encoder.config.num_hidden_layers for encoder in encoders if encoder is not None)
        for job in jobs:
            if job.clip_skip > layers:
                raise RenderError(
                    f"job {job.key}: clip_skip {job.clip_skip} exceeds the text encoder's {layers} layers"
                )

    @torch.no_grad()
    def _render_batch(self, batch: list[RenderJob]) -> list[RenderedImage]:
        # 1. Per-image noise and generators, from the seeds alone.
        settings = batch[0].settings
        factor = self.pipeline.vae_scale_factor
        shape = (
            1,
            self.pipeline.unet.config.in_channels,
            settings.height // factor,
            settings.width // factor,
        )
        noise, generators = zip(*(initial_noise(job.seed, shape) for job in batch), strict=True)
        latents = torch.cat(noise).to(device=self.device, dtype=self.dtype)  # (B, C, h/8, w/8)
        # 2. Prompts, then denoise with a fresh scheduler of the batch's kind.
        self.pipeline.scheduler = make_scheduler(settings.scheduler, prediction_type=self._prediction_type)
        prompts = prompt_inputs(
            self.pipeline,
            [job.prompt for job in batch],
            [job.negative_prompt for job in batch],
            clip_skip=settings.clip_skip,
        )
        latents = self.pipeline(
            **prompts,
            num_inference_steps=settings.steps,
            guidance_scale=settings.cfg,
            width=settings.width,
            height=settings.height,
            latents=latents,
            generator=list(generators),
            output_type="latent",
        ).images
        # 3. Decode with the NaN / black check, then to 8-bit images.
        images, upcast = decode_checked(self.pipeline.vae, latents, keys=[job.key for job in batch])
        pil_images = self.pipeline.image_processor.postprocess(images, output_type="pil")
        return [
            RenderedImage(job, image, up) for job, image, up in zip(batch, pil_images, upcast, strict=True)
        ]


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] from pipeline latents: ``z / scaling_factor`` (``z·std/sf + mean`` if set)."""
    config = vae.config
    z = latents.to(device=vae.device, dtype=vae.dtype)  # (B, C, h, w)
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        mean_z, std_z = (torch.tensor(v).view(1, -1, 1, 1).to(z) for v in (mean, std))
        z = z * std_z / config.scaling_factor + mean_z
    else:
        z = z / config.scaling_factor
    return vae.decode(z, return_dict=False)[0]  # (B, 3, H, W)


def bad_images(images: torch.Tensor) -> torch.Tensor:
    """Per image: any non-finite value, or all black once quantised to 8 bits as diffusers does."""
    finite = torch.isfinite(images).flatten(1).all(dim=1)
    quantised = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round()
    black = quantised.flatten(1).amax(dim=1) == 0
    return ~finite | black  # (B,) bool


def decode_checked(
    vae: AutoencoderKL, latents: torch.Tensor, *, keys: Sequence[str]
) -> tuple[torch.Tensor, list[bool]]:
    """Decode; re-decode bad images with an fp32 copy of the VAE; ``RenderError`` if still bad.

    Returns fp32 images in [-1, 1] and, per image, whether the fp32 fallback was used. The live VAE
    is never modified (the fp32 copy is temporary).
    """
    images = decode_latents(vae, latents).float()
    bad = bad_images(images)
    if not bad.any():
        return images, [False] * len(keys)
    if vae.dtype != torch.float32:
        vae_fp32 = copy.deepcopy(vae).float()
        images[bad] = decode_latents(vae_fp32, latents[bad]).float()
    still_bad = bad_images(images)
    if still_bad.any():
        key = keys[int(still_bad.nonzero()[0])]
        raise RenderError(
            f"NaN/black image for job key {key} even with the VAE in fp32: the merged weights are probably "
            "broken (look for non-finite values or extreme merge weights)"
        )
    return images, bad.tolist()


def png_text(rendered: RenderedImage) -> dict[str, str]:
    """The PNG text chunks of an image: prompt, negative_prompt, seed, item, key, settings (JSON)."""
    job = rendered.job
    return {
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "seed": str(job.seed),
        "item": str(job.item),
        "key": job.key,
        "settings": json.dumps(job.settings.as_dict(), sort_keys=True),
    }


def save_png(rendered: RenderedImage, folder: Path) -> Path:
    """Write ``folder/<key>.png`` atomically, its settings in PNG text chunks."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for name, value in png_text(rendered).items():
        info.add_text(name, value)  # Pillow writes iTXt (UTF-8) when the text is not latin-1
    target = folder / f"{rendered.job.key}.png"
    with atomic_writer(target) as file:
        rendered.image.save(file, format="PNG", pnginfo=info)
    return target
