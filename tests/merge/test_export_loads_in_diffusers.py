"""An exported checkpoint loaded by a tool nobody here wrote (issue 15): diffusers' own
``from_single_file`` converter, given local configs only (no hub), reads back exactly the weights that
automerge renders with."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from automerge.merge import export_merge, plan_checkpoint, plan_merge, recipe_from_data
from automerge.render import RenderConfig
from automerge.render.session import RenderSession
from automerge.tiny import write_tiny

COMPONENTS = {"sd1": ("unet", "vae", "text_encoder"), "sdxl": ("unet", "vae", "text_encoder")}
# SDXL's second (OpenCLIP) text encoder: diffusers' converter leaves layers 12–31 of the tiny 32-layer
# encoder on the meta device (its own limitation at this width); the first encoder, UNet and VAE load.


def _config_folder(session: RenderSession, folder: Path) -> Path:
    """model_index.json and every component's config (tokenizers in full), no weights: diffusers must
    take the weights from the single file."""
    session.pipeline.save_config(folder)
    for name, component in session.pipeline.components.items():
        if component is None:
            continue
        if hasattr(component, "save_vocabulary"):  # a tokenizer
            component.save_pretrained(folder / name)
        elif hasattr(component, "save_config"):  # diffusers models and schedulers
            component.save_config(folder / name)
        else:  # transformers models
            component.config.save_pretrained(folder / name)
    assert not list(folder.rglob("*.safetensors")) and not list(folder.rglob("*.bin"))
    return folder


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_from_single_file_loads_the_export_with_the_same_weights(
    family: str, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    a = write_tiny(family, tmp_path / "a.safetensors", seed=1)
    b = write_tiny(family, tmp_path / "b.safetensors", seed=2, like=a)
    recipe = recipe_from_data(
        {
            "models": {"a": str(a), "b": str(b)},
            "method": "weighted_sum",
            "params": {"alpha": {"default": 0.3, "IN00": 0.8}},
            "dtype": "fp32",
        },
        source="t",
    )
    plan = plan_merge(recipe, source="t")
    out = export_merge(plan, tmp_path / "merged.safetensors")
    plan.close()
    merged = plan_checkpoint(out)
    try:
        session = RenderSession(merged, RenderConfig(device="cpu"))
        session.apply()
        config = _config_folder(session, tmp_path / "config")
        pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
        extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
        loaded = pipeline_class.from_single_file(
            str(out), config=str(config), local_files_only=True, torch_dtype=torch.float32, **extra
        )
        for component in COMPONENTS[family]:
            ours = getattr(session.pipeline, component).state_dict()
            theirs = getattr(loaded, component).state_dict()
            assert ours.keys() == theirs.keys(), component
            different = [key for key in ours if not torch.equal(ours[key].float(), theirs[key].float())]
            assert different == [], (component, different[:5])
    finally:
        merged.close()
