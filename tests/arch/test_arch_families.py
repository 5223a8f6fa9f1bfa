"""Families are data files: every file in ``arch/data/families/`` is registered, its real and tiny
configs and detection facts agree, and a bad file is a ConfigError naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from automerge.arch import ARCHITECTURES, VAE_BLOCK
from automerge.arch._loader import FAMILIES, load_family
from automerge.errors import ConfigError


def test_every_family_file_is_registered_under_its_file_name() -> None:
    assert sorted(path.stem for path in FAMILIES.glob("*.yaml")) == ARCHITECTURES.names()
    assert ARCHITECTURES.names() == ["sd1", "sd2", "sdxl"]


@pytest.mark.parametrize("family", ARCHITECTURES.names())
def test_tiny_configs_keep_the_real_topology(family: str) -> None:
    arch = ARCHITECTURES.get(family)
    assert list(arch.tiny_configs) == list(arch.configs) == [c.name for c in arch.components]
    for name, config in arch.configs.items():
        tiny = arch.tiny_configs[name]
        assert set(tiny) == set(config)
        for option in ("_class", "layers_per_block", "num_hidden_layers", "down_block_types", "hidden_act"):
            assert tiny.get(option) == config.get(option), f"{name}.{option}"


def test_tiny_configs_are_copies_of_the_family_data() -> None:
    arch = ARCHITECTURES.get("sd1")
    arch.tiny_configs["unet"]["down_block_types"].append("changed")  # type: ignore[attr-defined]
    try:
        assert arch.configs["unet"]["down_block_types"][-1] == "DownBlock2D"
    finally:
        arch.tiny_configs["unet"]["down_block_types"].pop()  # type: ignore[attr-defined]


@pytest.mark.parametrize("family", ARCHITECTURES.names())
def test_detection_facts_agree_with_the_real_configs(family: str) -> None:
    arch = ARCHITECTURES.get(family)
    unet = arch.configs["unet"]
    assert arch.detection.unet_input.channels == unet["in_channels"]
    if arch.detection.unet_only is not None:
        assert arch.detection.unet_only.width == unet["cross_attention_dim"]
    for folder, options in arch.detection.folder_configs.items():
        for option, value in options.items():
            assert arch.configs[folder][option] == arch.tiny_configs[folder][option] == value


def test_sd2_is_sd1_with_the_open_clip_text_encoder_and_v_prediction() -> None:
    sd1, sd2 = ARCHITECTURES.get("sd1"), ARCHITECTURES.get("sd2")
    assert sd2.blocks == sd1.blocks
    assert sd2.prediction_type == "v_prediction" and sd1.prediction_type == "epsilon"
    assert sd2.component_of("cond_stage_model.model.ln_final.weight").name == "text_encoder"  # type: ignore[union-attr]
    assert sd2.block_of("cond_stage_model.model.ln_final.weight", torch.float32) == "BASE"
    assert sd2.block_of("first_stage_model.decoder.conv_in.weight", torch.float32) == VAE_BLOCK


def _edited_family(tmp_path: Path, edit: dict[str, object], *, name: str = "sd1") -> Path:
    data = yaml.safe_load((FAMILIES / "sd1.yaml").read_text(encoding="utf-8"))
    data.update(edit)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def test_a_copied_family_file_loads_as_a_new_family(tmp_path: Path) -> None:
    path = _edited_family(tmp_path, {"name": "sd1_copy", "title": "A copy"}, name="sd1_copy")
    copy, sd1 = load_family(path), ARCHITECTURES.get("sd1")
    assert (copy.name, copy.title, copy.blocks, copy.configs) == (
        "sd1_copy",
        "A copy",
        sd1.blocks,
        sd1.configs,
    )
    key = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    assert copy.targets(key) == sd1.targets(key) and copy.block_of(key, torch.float32) == "IN04"


def _component_edit(**changes: object) -> dict[str, object]:
    data = yaml.safe_load((FAMILIES / "sd1.yaml").read_text(encoding="utf-8"))
    components = data["components"]
    components[1] = {**components[1], **changes}
    return {"components": components}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"titel": "x"}, r"unknown key 'titel' \(did you mean 'title'\?\)"),
        ({"name": "other"}, r"field 'name': must be the file's name 'sd1', got 'other'"),
        ({"prediction_type": "flow"}, r"field 'prediction_type'"),
        (
            _component_edit(keys={"rule": "clipp"}),
            r"components\.1\.keys.*unknown key rule 'clipp' \(did you mean 'clip'\?\)",
        ),
        (
            _component_edit(keys={"rule": "open_clip", "args": {"layers": 3}}),
            r"components\.1\.keys.*key rule 'open_clip' with args \{'layers': 3\}",
        ),
        (_component_edit(block="BAS"), r"field 'components': text_encoder: block 'BAS' is not one of BASE"),
        (
            {"tiny": {"unet": {"widht": 8}}},
            r"field 'tiny': unet: \['widht'\] are not options of its real config",
        ),
        (
            {"pipeline": {"diffusers_class": "X", "tokenizers": {"clip": {"folder": "t", "pad_token": "!"}}}},
            r"\['clip'\]",
        ),
    ],
)
def test_a_bad_family_file_names_the_file_and_field(
    tmp_path: Path, edit: dict[str, object], message: str
) -> None:
    path = _edited_family(tmp_path, edit)
    with pytest.raises(ConfigError, match=message) as raised:
        load_family(path)
    assert str(raised.value).startswith(str(path))
