"""Diffusers pipelines assembled from live modules, with nothing fetched from the hub.

The merge engine hands over its live UNet, text encoder(s) and VAE as ``PipelineModules``; this module
adds tokenizers (local folder or vendored BPE), a scheduler built from the project's own config
(``schedulers.py``), SDPA attention, and returns the diffusers pipeline that the family's data file names
(``pipeline.diffusers_class``: ``StableDiffusionPipeline`` for SD1/SD2, ``StableDiffusionXLPipeline`` for
SDXL) with no safety checker, watermarker or progress bars. The tokenizers' sub-folders and padding
tokens come from the same data file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from automerge.arch import ARCHITECTURES, Architecture
from automerge.errors import ConfigError
from automerge.render.schedulers import PREDICTION_TYPES, make_scheduler
from automerge.render.tokenizers import TokenizerCache

DEFAULT_SCHEDULER = "euler"  # replaced per batch by the Renderer with each job's scheduler


@dataclass
class PipelineModules:
    """The live modules of one model; the render code does not care where they come from."""

    family: str  # "sd1" | "sd2" | "sdxl"
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection | None  # SDXL only
    vae: AutoencoderKL
    prediction_type: str = "epsilon"  # or "v_prediction" (SD2-768)


def pipeline_modules(
    modules: Mapping[str, torch.nn.Module], *, family: str, prediction_type: str = "epsilon"
) -> PipelineModules:
    """``PipelineModules`` from components named as the architectures name them (``unet``,
    ``text_encoder``, ``text_encoder_2``, ``vae``), e.g. a live engine's ``modules``."""
    return PipelineModules(
        family=family,
        unet=modules["unet"],
        text_encoder=modules["text_encoder"],
        text_encoder_2=modules.get("text_encoder_2"),
        vae=modules["vae"],
        prediction_type=prediction_type,
    )


Assemble = Callable[[PipelineModules, tuple[CLIPTokenizer, ...], object], DiffusionPipeline]


def _stable_diffusion(
    modules: PipelineModules, tokenizers: tuple[CLIPTokenizer, ...], scheduler: object
) -> DiffusionPipeline:
    return StableDiffusionPipeline(
        vae=modules.vae,
        text_encoder=modules.text_encoder,
        tokenizer=tokenizers[0],
        unet=modules.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _stable_diffusion_xl(
    modules: PipelineModules, tokenizers: tuple[CLIPTokenizer, ...], scheduler: object
) -> DiffusionPipeline:
    return StableDiffusionXLPipeline(
        vae=modules.vae,
        text_encoder=modules.text_encoder,
        text_encoder_2=modules.text_encoder_2,
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=modules.unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


PIPELINE_CLASSES: dict[str, Assemble] = {
    "StableDiffusionPipeline": _stable_diffusion,
    "StableDiffusionXLPipeline": _stable_diffusion_xl,
}
"""A family data file's ``pipeline.diffusers_class`` → how that diffusers pipeline is assembled."""


def build_pipeline(
    modules: PipelineModules,
    *,
    tokenizer_dir: Path | None = None,
    device: torch.device | str,
    dtype: torch.dtype,
    compile_unet: bool = False,
    tokenizers: TokenizerCache | None = None,
) -> DiffusionPipeline:
    """A ready pipeline over ``modules`` (moved to ``device``/``dtype``, eval mode, SDPA attention).

    ``tokenizer_dir``: a diffusers model folder (``tokenizer/``, and ``tokenizer_2/`` for SDXL) or, for
    one-encoder families, a tokenizer folder; unset = the vendored CLIP BPE. ``tokenizers``: a cache
    to share between pipelines of one process. ``compile_unet``: ``torch.compile`` the UNet in place.
    """
    # 1. Check the modules against their family before any work.
    arch = ARCHITECTURES.get(modules.family)
    assemble = _assembler(arch)
    _check_modules(modules, arch)
    # 2. Tokenizers, scheduler, pipeline.
    cache = tokenizers if tokenizers is not None else TokenizerCache()
    folders = _tokenizer_folders(arch, tokenizer_dir)
    pads = [tokenizer.pad_token for tokenizer in arch.pipeline.tokenizers.values()]
    built = tuple(cache.get(folder=f, pad_token=p) for f, p in zip(folders, pads, strict=True))
    scheduler = make_scheduler(DEFAULT_SCHEDULER, prediction_type=modules.prediction_type)
    pipeline = assemble(modules, built, scheduler)
    # 3. Device, dtype, inference mode, attention, progress bars.
    for module in (modules.unet, modules.text_encoder, modules.text_encoder_2, modules.vae):
        if module is not None:
            _place(module, device=device, dtype=dtype)
    modules.unet.set_attn_processor(AttnProcessor2_0())
    modules.vae.set_attn_processor(AttnProcessor2_0())
    pipeline.set_progress_bar_config(disable=True)
    if compile_unet:
        modules.unet.compile()  # in place: the module keeps its type, config and live parameters
    return pipeline


def _place(module: torch.nn.Module, *, device: torch.device | str, dtype: torch.dtype) -> None:
    """Move ``module`` to ``device``; cast only if needed (diffusers warns on every dtype ``to()``)."""
    module.to(device=device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    module.eval()


def clip_hidden_states(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: Sequence[str], *, clip_skip: int
) -> torch.Tensor:
    """(B, 77, hidden) prompt embeddings, A1111 clip skip: the last layer's output (``clip_skip`` 1), else
    the hidden state ``clip_skip`` layers from the end through the final LayerNorm."""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    output = text_encoder(ids, output_hidden_states=clip_skip > 1)
    if clip_skip == 1:
        return output.last_hidden_state
    # transformers 5 flattened CLIPTextModel (no `.text_model`), which diffusers 0.42's clip_skip expects.
    final_layer_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    return final_layer_norm(output.hidden_states[-clip_skip])


def _sd_prompt_inputs(
    pipeline: Any, prompts: Sequence[str], negative_prompts: Sequence[str], clip_skip: int
) -> dict[str, Any]:
    def encode(texts: Sequence[str]) -> torch.Tensor:
        return clip_hidden_states(pipeline.tokenizer, pipeline.text_encoder, texts, clip_skip=clip_skip)

    return {"prompt_embeds": encode(prompts), "negative_prompt_embeds": encode(negative_prompts)}


def _sdxl_prompt_inputs(
    pipeline: Any, prompts: Sequence[str], negative_prompts: Sequence[str], clip_skip: int
) -> dict[str, Any]:
    # SDXL conditions on the penultimate layers; diffusers counts its clip_skip from there.
    skip = None if clip_skip == 1 else clip_skip - 1
    return {"prompt": list(prompts), "negative_prompt": list(negative_prompts), "clip_skip": skip}


_PROMPT_INPUTS: dict[type, Callable[[Any, Sequence[str], Sequence[str], int], dict[str, Any]]] = {
    StableDiffusionPipeline: _sd_prompt_inputs,
    StableDiffusionXLPipeline: _sdxl_prompt_inputs,
}


def prompt_inputs(
    pipeline: DiffusionPipeline, prompts: Sequence[str], negative_prompts: Sequence[str], *, clip_skip: int
) -> dict[str, Any]:
    """The pipeline-call arguments carrying a batch's prompts, with A1111 ``clip_skip`` (1 = last layer).

    SD1/SD2 prompts are encoded here (``clip_hidden_states``); SDXL's go to diffusers as text.
    """
    build = _PROMPT_INPUTS.get(type(pipeline))
    if build is None:
        raise TypeError(
            f"no prompt encoding for {type(pipeline).__name__}; build pipelines with build_pipeline"
        )
    return build(pipeline, prompts, negative_prompts, clip_skip)


def _assembler(arch: Architecture) -> Assemble:
    name = arch.pipeline.diffusers_class
    if name not in PIPELINE_CLASSES:
        raise ConfigError(
            f"family '{arch.name}': pipeline class '{name}' is not one automerge builds; "
            f"known: {', '.join(PIPELINE_CLASSES)}"
        )
    return PIPELINE_CLASSES[name]


def _check_modules(modules: PipelineModules, arch: Architecture) -> None:
    if modules.prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type must be one of {PREDICTION_TYPES}, got {modules.prediction_type!r}"
        )
    needs_text_encoder_2 = any(component.name == "text_encoder_2" for component in arch.components)
    if needs_text_encoder_2 != (modules.text_encoder_2 is not None):
        need = "needs" if needs_text_encoder_2 else "takes no"
        raise ValueError(f"family '{modules.family}' {need} text_encoder_2")


def _tokenizer_folders(arch: Architecture, tokenizer_dir: Path | None) -> tuple[Path | None, ...]:
    """Where each text encoder's tokenizer is saved (``None`` = build from the vendored BPE)."""
    names = [tokenizer.folder for tokenizer in arch.pipeline.tokenizers.values()]
    if tokenizer_dir is None:
        return (None,) * len(names)
    tokenizer_dir = Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise ConfigError(f"tokenizer_dir {tokenizer_dir}: folder not found")
    subfolders = tuple(tokenizer_dir / name for name in names)
    if all(folder.is_dir() for folder in subfolders):
        return subfolders
    if len(subfolders) == 1:
        return (tokenizer_dir,)
    missing = ", ".join(f"{f.name}/" for f in subfolders if not f.is_dir())
    wanted = " and ".join(f"{name}/" for name in names)
    raise ConfigError(
        f"tokenizer_dir {tokenizer_dir}: has no {missing}; {arch.title} needs a diffusers model folder "
        f"with {wanted}"
    )
