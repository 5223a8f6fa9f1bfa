"""Diffusers folders: the family is detected from the component folders and their configs (at any width,
tiny included), and the folder reads back as the same original-layout tensors as a tiny file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from automerge.arch import ARCHITECTURES
from automerge.checkpoints.model import open_model
from automerge.errors import UnsupportedModelError
from automerge.render.modules import build_modules
from automerge.tiny import make_tiny_state_dict


def _write_folder(family: str, root: Path, *, seed: int = 0) -> Path:
    """A tiny diffusers folder of ``family``: one ``save_pretrained`` sub-folder per component."""
    torch.manual_seed(seed)
    for name, module in build_modules(ARCHITECTURES.get(family).tiny_configs).items():
        module.save_pretrained(root / name)
    return root


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_tiny_diffusers_folder_is_detected_as_its_family(family: str, tmp_path: Path) -> None:
    with open_model(_write_folder(family, tmp_path)) as model:
        assert model.arch.name == family
        assert model.layout == "diffusers"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_diffusers_folder_reads_back_the_tensors_of_the_tiny_file(family: str, tmp_path: Path) -> None:
    expected = make_tiny_state_dict(ARCHITECTURES.get(family), seed=0)
    with open_model(_write_folder(family, tmp_path, seed=0)) as model:
        keys = model.checkpoint.keys()
        assert {k for k in keys if k.startswith("model.diffusion_model.")} == {
            k for k in expected if k.startswith("model.diffusion_model.")
        }
        for key in keys:
            assert torch.equal(model.checkpoint.load(key), expected[key]), key


def test_sdxl_folder_without_its_first_text_encoder_is_a_refiner(tmp_path: Path) -> None:
    root = _write_folder("sdxl", tmp_path)
    shutil.rmtree(root / "text_encoder")
    with pytest.raises(
        UnsupportedModelError, match=f"{root}: SDXL refiner checkpoints are not supported yet"
    ):
        open_model(root)


def test_folder_with_a_nine_channel_unet_is_inpainting(tmp_path: Path) -> None:
    root = _write_folder("sd1", tmp_path)
    config = json.loads((root / "unet" / "config.json").read_text())
    (root / "unet" / "config.json").write_text(json.dumps(config | {"in_channels": 9}))
    with pytest.raises(UnsupportedModelError, match=r"inpainting checkpoints \(UNet input with 9 channels\)"):
        open_model(root)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_folder_headers_give_the_shape_and_dtype_that_loading_gives(
    family: str, tmp_path: Path
) -> None:
    """``info`` (headers only: fused q/k/v rows, 1×1 convs from linears, transposes) must agree with
    ``load`` on every key, since plans and --dry-run size the merge from headers alone."""
    from automerge.errors import CheckpointError

    with open_model(_write_folder(family, tmp_path)) as model:
        checkpoint = model.checkpoint
        for key in checkpoint.keys():
            tensor = checkpoint.load(key)
            info = checkpoint.info(key)
            assert (info.shape, info.dtype) == (tuple(tensor.shape), tensor.dtype), key
        missing = "model.diffusion_model.input_blocks.0.0.weigth"
        with pytest.raises(
            CheckpointError, match=rf"^{tmp_path}: no tensor named '{missing}'.*input_blocks.0.0.weight"
        ):
            checkpoint.info(missing)


def test_a_components_config_becomes_the_live_module_config() -> None:
    """diffusers configs keep every option and take the family's class; transformers configs (they name
    a model_type) keep the text-model options and their own class, else the family's."""
    from automerge.checkpoints.diffusers_folder import _live_config

    family = {"_class": "CLIPTextModel"}
    unet = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.30", "sample_size": 8}
    assert _live_config(unet, family) == {"_class": "CLIPTextModel", "sample_size": 8}
    text = {"model_type": "clip_text_model", "hidden_size": 32, "torch_dtype": "float16"}
    live = _live_config({**text, "architectures": ["CLIPTextModelWithProjection"]}, family)
    assert live["_class"] == "CLIPTextModelWithProjection" and live["hidden_size"] == 32
    assert "torch_dtype" not in live
    assert _live_config(text, family)["_class"] == "CLIPTextModel"  # no architectures: the family's
