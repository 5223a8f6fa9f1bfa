"""Offline pipelines and deterministic rendering on tiny SD1 / SDXL modules (64×64, 2–4 steps, CPU)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.models.autoencoders.vae import Decoder
from PIL import Image
from tiny_modules import job, tiny_sd1_modules, tiny_sdxl_modules, tiny_vae

from automerge.arch import ARCHITECTURES
from automerge.errors import ConfigError, RenderError
from automerge.render.payload import RenderJob
from automerge.render.pipeline import PIPELINE_CLASSES, build_pipeline, clip_hidden_states
from automerge.render.renderer import RenderedImage, Renderer, batches, decode_latents, save_png
from automerge.render.schedulers import SCHEDULERS, SD_NOISE_SCHEDULE, make_scheduler

CPU, FP32 = torch.device("cpu"), torch.float32
HERE = Path(__file__).resolve().parent


MIXED_JOBS = [
    job(0, 1),
    job(1, 1, scheduler="euler_a"),
    job(0, 2),
    job(2, 7, scheduler="dpmpp_2m"),
    job(1, 2, scheduler="euler_a"),
    job(2, 8),
    job(0, 3, scheduler="euler_a"),
]


def pixels(rendered: Sequence[RenderedImage]) -> list[np.ndarray]:
    return [np.asarray(r.image, dtype=np.int16) for r in rendered]


def render(pipeline: object, jobs: Sequence[RenderJob], *, batch_size: int = 4) -> list[RenderedImage]:
    return Renderer(pipeline, batch_size=batch_size, device=CPU, dtype=FP32).render(jobs)


@pytest.fixture(scope="module")
def sd1() -> StableDiffusionPipeline:
    return build_pipeline(tiny_sd1_modules(), device=CPU, dtype=FP32)


@pytest.fixture(scope="module")
def sdxl() -> StableDiffusionXLPipeline:
    return build_pipeline(tiny_sdxl_modules(), device=CPU, dtype=FP32)


# ---- pipelines ---------------------------------------------------------------------------------


def test_sd1_pipeline_is_built_offline_with_sdpa_and_no_safety_checker(sd1: StableDiffusionPipeline) -> None:
    assert type(sd1) is StableDiffusionPipeline
    assert sd1.safety_checker is None and sd1.feature_extractor is None
    assert {type(p).__name__ for p in sd1.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    assert {type(p).__name__ for p in sd1.vae.attn_processors.values()} == {"AttnProcessor2_0"}
    assert sd1._progress_bar_config == {"disable": True}
    assert not sd1.unet.training and not sd1.text_encoder.training


def test_package_exports_the_render_api_lazily() -> None:
    import automerge.render as render_package

    assert render_package.Renderer is Renderer and render_package.build_pipeline is build_pipeline
    assert set(render_package.__all__) >= {"load_payload", "Renderer", "save_png", "PipelineModules"}


def test_sdxl_pipeline_has_both_encoders_and_no_watermarker(sdxl: StableDiffusionXLPipeline) -> None:
    assert type(sdxl) is StableDiffusionXLPipeline
    assert sdxl.text_encoder_2 is not None and sdxl.watermark is None


def test_pipeline_scheduler_uses_the_sd_noise_schedule_and_prediction_type() -> None:
    pipeline = build_pipeline(tiny_sd1_modules(prediction_type="v_prediction"), device=CPU, dtype=FP32)

    config = pipeline.scheduler.config
    assert {key: config[key] for key in SD_NOISE_SCHEDULE} == dict(SD_NOISE_SCHEDULE)
    assert config.prediction_type == "v_prediction"
    (rendered,) = render(pipeline, [job(0, 1, steps=2, scheduler="dpmpp_2m")])
    assert type(pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipeline.scheduler.config.prediction_type == "v_prediction"  # kept when the renderer swaps it


@pytest.mark.parametrize(
    ("name", "class_name", "spacing"),
    [
        ("euler", "EulerDiscreteScheduler", "linspace"),
        ("euler_a", "EulerAncestralDiscreteScheduler", "linspace"),
        ("dpmpp_2m", "DPMSolverMultistepScheduler", "linspace"),
        ("dpmpp_2m_karras", "DPMSolverMultistepScheduler", "linspace"),
        ("ddim", "DDIMScheduler", "leading"),
    ],
)
def test_scheduler_registry_builds_the_a1111_equivalent(name: str, class_name: str, spacing: str) -> None:
    scheduler = make_scheduler(name, prediction_type="epsilon")

    assert type(scheduler).__name__ == class_name
    assert scheduler.config.timestep_spacing == spacing
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.steps_offset == 1


@pytest.mark.parametrize("name", SCHEDULERS.names())
def test_every_registered_scheduler_renders_finite_images(sd1: StableDiffusionPipeline, name: str) -> None:
    (rendered,) = render(sd1, [job(0, 1, scheduler=name, steps=2)])

    assert rendered.image.size == (64, 64) and not rendered.upcast_vae


def test_unknown_scheduler_is_config_error_with_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"unknown scheduler 'dpmpp2m' \(did you mean 'dpmpp_2m'\?\)"):
        make_scheduler("dpmpp2m")


def test_modules_that_do_not_fit_their_family_are_rejected() -> None:
    modules = tiny_sd1_modules()
    with pytest.raises(ValueError, match="family 'sdxl' needs text_encoder_2"):
        build_pipeline(dataclasses.replace(modules, family="sdxl"), device=CPU, dtype=FP32)
    with pytest.raises(ConfigError, match=r"unknown architecture 'sd3'"):
        build_pipeline(dataclasses.replace(modules, family="sd3"), device=CPU, dtype=FP32)
    with pytest.raises(ConfigError, match=r"unknown architecture 'sdlx' \(did you mean 'sdxl'\?\)"):
        build_pipeline(dataclasses.replace(modules, family="sdlx"), device=CPU, dtype=FP32)


@pytest.mark.parametrize("family", ARCHITECTURES.names())
def test_every_family_names_a_pipeline_render_builds_with_one_tokenizer_per_text_encoder(family: str) -> None:
    arch = ARCHITECTURES.get(family)
    text_encoders = [c.name for c in arch.components if c.name.startswith("text_encoder")]

    assert arch.pipeline.diffusers_class in PIPELINE_CLASSES
    assert list(arch.pipeline.tokenizers) == text_encoders


# ---- rendering --------------------------------------------------------------------------------


def test_initial_latents_are_unit_noise_from_the_seed_scaled_once_by_init_noise_sigma(
    sd1: StableDiffusionPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[torch.Tensor] = []
    real_forward = type(sd1.unet).forward

    def spy(self: torch.nn.Module, sample: torch.Tensor, *args: object, **kwargs: object) -> object:
        seen.append(sample.clone())
        return real_forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(type(sd1.unet), "forward", spy)
    render(sd1, [job(0, 5, steps=2)])

    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    scheduler = make_scheduler("euler")
    scheduler.set_timesteps(2)
    # diffusers: latents · init_noise_sigma, then scale_model_input divides by sqrt(σ₀² + 1) before the UNet
    expected = noise * scheduler.init_noise_sigma / (scheduler.sigmas[0] ** 2 + 1) ** 0.5
    assert torch.allclose(seen[0], torch.cat([expected, expected]), atol=1e-5)  # CFG batch (uncond, cond)


def test_output_order_is_input_order(sd1: StableDiffusionPipeline) -> None:
    rendered = render(sd1, MIXED_JOBS, batch_size=2)

    assert [r.job for r in rendered] == MIXED_JOBS


def test_jobs_batch_by_shared_settings_in_first_seen_order() -> None:
    assert batches(MIXED_JOBS, 2) == [[0, 2], [5], [1, 4], [6], [3]]


def test_batched_render_equals_one_by_one(sd1: StableDiffusionPipeline) -> None:
    batched = pixels(render(sd1, MIXED_JOBS, batch_size=3))
    single = pixels(render(sd1, MIXED_JOBS, batch_size=1))

    # On this CPU the two are bit-exact; allow one 8-bit level for BLAS kernels that block by batch size.
    for a, b in zip(batched, single, strict=True):
        assert np.abs(a - b).max() <= 1


def test_sdxl_batched_render_equals_one_by_one(sdxl: StableDiffusionXLPipeline) -> None:
    jobs = [
        job(0, 1, steps=3),
        job(1, 2, steps=3),
        job(2, 3, steps=3, scheduler="euler_a"),
        job(0, 4, steps=3, scheduler="euler_a"),
    ]

    batched = pixels(render(sdxl, jobs, batch_size=4))
    single = pixels(render(sdxl, jobs, batch_size=1))

    for a, b in zip(batched, single, strict=True):
        assert np.abs(a - b).max() <= 1


def test_images_depend_on_seed_prompt_and_clip_skip(sd1: StableDiffusionPipeline) -> None:
    base, other_seed, other_prompt, skipped = pixels(
        render(sd1, [job(0, 1), job(0, 2), job(0, 1, prompt="a blue whale"), job(0, 1, clip_skip=2)])
    )

    for other in (other_seed, other_prompt, skipped):
        assert np.abs(base - other).max() > 2


def test_sd_prompt_embeddings_match_diffusers_and_a1111_clip_skip(sd1: StableDiffusionPipeline) -> None:
    prompts = ["a lighthouse at dusk", "red apples"]
    ours = clip_hidden_states(sd1.tokenizer, sd1.text_encoder, prompts, clip_skip=1)
    theirs, _ = sd1.encode_prompt(prompts, CPU, 1, do_classifier_free_guidance=False)
    assert torch.equal(ours, theirs)

    ids = sd1.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    penultimate = sd1.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    expected = torch.nn.functional.layer_norm(
        penultimate, (16,), sd1.text_encoder.final_layer_norm.weight, sd1.text_encoder.final_layer_norm.bias
    )
    assert torch.allclose(clip_hidden_states(sd1.tokenizer, sd1.text_encoder, prompts, clip_skip=2), expected)


def test_sdxl_images_depend_on_clip_skip(sdxl: StableDiffusionXLPipeline) -> None:
    last, skipped = pixels(render(sdxl, [job(0, 1, steps=2), job(0, 1, steps=2, clip_skip=2)]))

    assert np.abs(last - skipped).max() > 2


def test_same_modules_and_jobs_render_identical_pixels_twice(sd1: StableDiffusionPipeline) -> None:
    first = pixels(render(sd1, MIXED_JOBS))
    second = pixels(render(sd1, MIXED_JOBS))

    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


FRESH_PROCESS = """
import sys, torch
sys.path.insert(0, {here!r})
from tiny_modules import tiny_sd1_modules
from test_render_pipeline import MIXED_JOBS
from automerge.render.pipeline import PIPELINE_CLASSES, build_pipeline, clip_hidden_states
from automerge.render.renderer import Renderer, save_png
pipeline = build_pipeline(tiny_sd1_modules(), device="cpu", dtype=torch.float32)
for rendered in Renderer(pipeline, device="cpu", dtype=torch.float32).render(MIXED_JOBS):
    save_png(rendered, {out!r})
"""


@pytest.mark.slow
def test_a_fresh_process_writes_byte_identical_pngs(sd1: StableDiffusionPipeline, tmp_path: Path) -> None:
    here_dir, there_dir = tmp_path / "here", tmp_path / "there"
    for rendered in render(sd1, MIXED_JOBS):
        save_png(rendered, here_dir)

    code = FRESH_PROCESS.format(here=str(HERE), out=str(there_dir))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]

    names = sorted(p.name for p in here_dir.iterdir())
    assert names == sorted(p.name for p in there_dir.iterdir()) and len(names) == len(MIXED_JOBS)
    assert all((here_dir / n).read_bytes() == (there_dir / n).read_bytes() for n in names)


def test_clip_skip_beyond_the_text_encoder_is_render_error_before_compute(
    sd1: StableDiffusionPipeline,
) -> None:
    layers = sd1.text_encoder.config.num_hidden_layers

    with pytest.raises(
        RenderError,
        match=rf"job i00-s0001: clip_skip {layers + 1} exceeds the text encoder's {layers} layers",
    ):
        render(sd1, [job(0, 1, clip_skip=layers + 1)])


# ---- NaN / black images -----------------------------------------------------------------------


def nan_when(condition: object) -> object:
    """A ``Decoder.forward`` that returns NaN when ``condition(decoder)`` holds (simulated overflow)."""
    real_forward = Decoder.forward

    def forward(self: Decoder, z: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        out = real_forward(self, z, *args, **kwargs)
        return torch.full_like(out, float("nan")) if condition(self) else out  # type: ignore[operator]

    return forward


def test_decoder_nan_even_in_fp32_is_render_error_naming_the_job(
    sd1: StableDiffusionPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Decoder, "forward", nan_when(lambda decoder: True))

    with pytest.raises(RenderError, match=r"NaN/black image for job key i02-s0007 even with the VAE in fp32"):
        render(sd1, [job(2, 7)])


def test_all_black_image_is_render_error(
    sd1: StableDiffusionPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_forward = Decoder.forward
    monkeypatch.setattr(Decoder, "forward", lambda self, z, *a, **k: real_forward(self, z, *a, **k) * 0 - 1.5)

    with pytest.raises(RenderError, match=r"NaN/black image for job key i00-s0001"):
        render(sd1, [job(0, 1)])


def test_vae_nan_only_in_half_precision_is_redecoded_in_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    modules = tiny_sd1_modules()
    modules.vae.to(torch.bfloat16).to(torch.float32)  # weights exactly representable in bf16
    pipeline = build_pipeline(modules, device=CPU, dtype=FP32)
    jobs = [job(0, 1), job(1, 2)]
    reference = render(pipeline, jobs)

    pipeline.vae.to(torch.bfloat16)  # the pipeline's VAE now runs in half precision
    monkeypatch.setattr(
        Decoder, "forward", nan_when(lambda decoder: decoder.conv_in.weight.dtype != torch.float32)
    )
    recovered = render(pipeline, jobs)

    assert [r.upcast_vae for r in reference] == [False, False]
    assert [r.upcast_vae for r in recovered] == [True, True]
    assert all(np.array_equal(a, b) for a, b in zip(pixels(reference), pixels(recovered), strict=True))
    assert pipeline.vae.dtype == torch.bfloat16  # the live VAE is left as it was


def test_decode_applies_latents_mean_and_std_when_the_vae_config_has_them() -> None:
    plain = tiny_vae().eval()
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 1.0, 2.0]
    shifted = tiny_vae(latents_mean=mean, latents_std=std).eval()
    shifted.load_state_dict(plain.state_dict())
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))

    with torch.no_grad():
        z = latents * torch.tensor(std).view(1, 4, 1, 1) / plain.config.scaling_factor
        expected = plain.decode(z + torch.tensor(mean).view(1, 4, 1, 1)).sample
        assert torch.allclose(decode_latents(shifted, latents), expected, atol=1e-6)
        assert torch.allclose(
            decode_latents(plain, latents), plain.decode(latents / plain.config.scaling_factor).sample
        )


def test_rendering_no_jobs_gives_no_images(sd1: StableDiffusionPipeline) -> None:
    assert render(sd1, []) == []


# ---- PNG files --------------------------------------------------------------------------------


def test_png_carries_prompt_seed_and_settings(sd1: StableDiffusionPipeline, tmp_path: Path) -> None:
    (rendered,) = render(sd1, [job(1, 2, prompt="café ☕ at dawn", clip_skip=2, scheduler="ddim", steps=2)])

    path = save_png(rendered, tmp_path / "images")

    assert path == tmp_path / "images" / "i01-s0002.png"
    with Image.open(path) as image:
        text = dict(image.text)  # type: ignore[attr-defined]
        assert np.array_equal(np.asarray(image), np.asarray(rendered.image))
    assert {k: text[k] for k in ("prompt", "negative_prompt", "seed", "item", "key")} == {
        "prompt": "café ☕ at dawn",
        "negative_prompt": "blurry",
        "seed": "2",
        "item": "1",
        "key": "i01-s0002",
    }
    assert json.loads(text["settings"]) == {
        "steps": 2,
        "cfg": 5.0,
        "width": 64,
        "height": 64,
        "scheduler": "ddim",
        "clip_skip": 2,
    }


def test_save_png_replaces_atomically_and_leaves_no_temp_files(
    sd1: StableDiffusionPipeline, tmp_path: Path
) -> None:
    first, second = render(sd1, [job(0, 1), job(0, 2)])
    second = dataclasses.replace(second, job=first.job)  # same key, other pixels

    save_png(first, tmp_path)
    path = save_png(second, tmp_path)

    assert [p.name for p in tmp_path.iterdir()] == ["i00-s0001.png"]
    with Image.open(path) as image:
        assert np.array_equal(np.asarray(image), np.asarray(second.image))
