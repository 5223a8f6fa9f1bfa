"""`automerge tiny`: real key layout at tiny widths, deterministic, read back by the real loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from automerge.arch import ARCHITECTURES, reference_keys
from automerge.checkpoints import open_file_checkpoint
from automerge.checkpoints.model import open_model
from automerge.tiny import write_tiny


def _required_keys(family: str) -> set[str]:
    return {r.key for r in reference_keys(family) if not r.optional and r.component != "ema"}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_tiny_model_has_the_real_key_layout_and_is_small(family: str, tmp_path: Path) -> None:
    path = write_tiny(family, tmp_path / "m.safetensors", seed=3)
    assert path.stat().st_size < 16e6
    with open_model(path) as model:
        assert model.arch.name == family
        assert model.layout == "original"
        keys = set(model.checkpoint.keys())
        assert _required_keys(family) <= keys
        assert all(
            ARCHITECTURES.get(family).component_of(k)
            or k in {"betas", "alphas_cumprod", "alphas_cumprod_prev"}
            for k in keys
        )


def test_tiny_sdxl_has_nine_input_blocks_two_text_encoders_and_label_emb(tmp_path: Path) -> None:
    with open_file_checkpoint(write_tiny("sdxl", tmp_path / "xl.safetensors")) as ckpt:
        keys = ckpt.keys()
    assert any(k.startswith("model.diffusion_model.label_emb.") for k in keys)
    assert {int(k.split(".")[3]) for k in keys if ".input_blocks." in k} == set(range(9))
    assert any(k.startswith("conditioner.embedders.1.model.") for k in keys)


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    a = write_tiny("sd1", tmp_path / "a.safetensors", seed=1)
    b = write_tiny("sd1", tmp_path / "b.safetensors", seed=1)
    c = write_tiny("sd1", tmp_path / "c.safetensors", seed=2)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_like_makes_a_small_seeded_perturbation(tmp_path: Path) -> None:
    base = write_tiny("sd1", tmp_path / "base.safetensors", seed=0, dtype="fp32")
    tuned = write_tiny("sd1", tmp_path / "tuned.safetensors", seed=7, like=base, delta=0.05, dtype="fp32")
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    with open_file_checkpoint(base) as b, open_file_checkpoint(tuned) as t:
        diff = (t.load(key) - b.load(key)).std() / b.load(key).std()
        assert 0.03 < diff.item() < 0.07
        assert torch.equal(t.load("alphas_cumprod"), b.load("alphas_cumprod"))


def test_tiny_refuses_a_like_model_of_another_family_and_a_non_positive_delta(tmp_path, capsys) -> None:
    """`tiny sd1 --like <sdxl>` wrote SDXL for an sd1 request; `--delta -1` was accepted."""
    from cli_helpers import run_cli

    base = tmp_path / "xl.safetensors"
    assert run_cli(capsys, "tiny", "sdxl", base).code == 0
    result = run_cli(capsys, "tiny", "sd1", tmp_path / "out.safetensors", "--like", base)
    assert result.code == 2 and "is a tiny sdxl model, not sd1" in result.err, result.err
    result = run_cli(capsys, "tiny", "sdxl", tmp_path / "out.safetensors", "--like", base, "--delta", "-1")
    assert result.code == 2 and "--delta must be greater than 0" in result.err, result.err
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_like_leaves_integer_buffers_as_they_were(family: str, tmp_path: Path) -> None:
    """`--like` perturbed position_ids into floats like −1.47 (every key went through .float()), and
    merges then copied them: integer buffers must keep their dtype and values."""
    a = write_tiny(family, tmp_path / "a.safetensors", seed=1)
    b = write_tiny(family, tmp_path / "b.safetensors", seed=2, like=a, delta=0.5)
    with open_file_checkpoint(a) as base, open_file_checkpoint(b) as tuned:
        integer = [k for k in base.keys() if not base.load(k).dtype.is_floating_point]
        assert integer, "the tiny models have position_ids"
        for key in integer:
            assert tuned.load(key).dtype == base.load(key).dtype, key
            assert torch.equal(tuned.load(key), base.load(key)), key
