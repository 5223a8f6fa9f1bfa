"""``extract_lora`` / ``automerge extract-lora``: B − A by truncated SVD per layer. At full rank the LoRA
applied to A gives B back; below it the error falls with the rank and is the discarded singular-value
energy; the kept energy per block is reported; the file is a kohya LoRA that ``read_lora`` reads back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli

from automerge.arch import ARCHITECTURES
from automerge.checkpoints import open_model, open_safetensors, save_safetensors
from automerge.errors import ConfigError
from automerge.lora import (
    Lora,
    LoraLayer,
    apply_loras,
    extract_lora,
    read_lora,
    truncated_svd,
    write_kohya_lora,
)


def shapes_of(path: Path) -> dict[str, tuple[int, ...]]:
    with open_safetensors(path) as checkpoint:
        return {key: checkpoint.info(key).shape for key in checkpoint.keys()}


def differences(a: Path, b: Path, keys: set[str]) -> dict[str, torch.Tensor]:
    with open_safetensors(a) as ca, open_safetensors(b) as cb:
        return {key: cb.load(key).float() - ca.load(key).float() for key in keys}


def squared_error(lora: Lora, diffs: dict[str, torch.Tensor]) -> float:
    return sum(float((lora.delta(key, d.shape) - d).double().square().sum()) for key, d in diffs.items())


def as_lora(layers: tuple, path: Path = Path("x")) -> Lora:
    grouped: dict[str, tuple] = {}
    for layer in layers:
        grouped[layer.key] = (*grouped.get(layer.key, ()), layer)
    return Lora(path, "kohya", grouped)


def test_a_full_rank_extraction_applied_to_a_gives_b(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    with open_model(tiny_models["c"]) as a, open_model(tiny_models["a"]) as b:
        extraction = extract_lora(a.checkpoint, b.checkpoint, a.arch, rank=10_000)
        lora = as_lora(extraction.layers)
        for key in lora.keys():
            weight_a, weight_b = a.checkpoint.load(key), b.checkpoint.load(key)
            diff = weight_b.float() - weight_a.float()
            delta = lora.delta(key, weight_a.shape)
            assert float((delta - diff).norm()) <= 1e-5 * float(diff.norm())
            rebuilt = apply_loras(weight_a, key, [(lora, 1.0)])
            torch.testing.assert_close(rebuilt, weight_b, rtol=1e-3, atol=1e-6)  # fp16 rounding only
    assert len(lora.keys()) == 72 + 192 + 86  # SD1: every kohya LoRA and LoCon layer
    assert all(kept == pytest.approx(1.0, abs=1e-5) for kept in extraction.kept_energy.values())


def test_the_error_falls_with_the_rank_and_is_the_discarded_energy(tiny_models: dict[str, Path]) -> None:
    blocks = ("IN01", "IN04", "OUT05", "BASE")
    with open_model(tiny_models["c"]) as a, open_model(tiny_models["b"]) as b:
        runs = {
            r: extract_lora(a.checkpoint, b.checkpoint, a.arch, rank=r, blocks=blocks) for r in (1, 2, 4, 8)
        }
    keys = {layer.key for layer in runs[1].layers}
    diffs = differences(tiny_models["c"], tiny_models["b"], keys)
    sigmas: dict[str, list[torch.Tensor]] = {}
    arch = ARCHITECTURES.get("sd1")
    for layer in runs[8].layers:
        d = diffs[layer.key]
        part = d if layer.rows is None else d[layer.rows[0] : layer.rows[1]]
        sigmas.setdefault(arch.block_of(layer.key, torch.float16), []).append(
            torch.linalg.svdvals(part.reshape(part.shape[0], -1).double())
        )
    errors = []
    for rank, extraction in runs.items():
        assert {layer.key for layer in extraction.layers} == keys
        assert max(layer.rank for layer in extraction.layers) == rank
        error = squared_error(as_lora(extraction.layers), diffs)
        discarded = sum(float(s[rank:].square().sum()) for parts in sigmas.values() for s in parts)
        assert error == pytest.approx(discarded, rel=1e-4)
        errors.append(error)
        assert list(extraction.kept_energy) == list(blocks[-1:] + blocks[:-1])  # the family's block order
        for block, parts in sigmas.items():
            kept = sum(float(s[:rank].square().sum()) for s in parts) / sum(
                float(s.square().sum()) for s in parts
            )
            assert extraction.kept_energy[block] == pytest.approx(kept, rel=1e-5)
    assert errors == sorted(errors, reverse=True) and errors[0] > errors[-1]


def test_the_extracted_file_is_a_kohya_lora_that_reads_back(
    tiny_sdxl_models: dict[str, Path], tmp_path: Path
) -> None:
    path = tmp_path / "diff.safetensors"
    with open_model(tiny_sdxl_models["c"]) as a, open_model(tiny_sdxl_models["a"]) as b:
        extraction = extract_lora(a.checkpoint, b.checkpoint, a.arch, rank=3)
        write_kohya_lora(path, extraction.layers, a.arch, metadata={"note": "test"})

    lora = read_lora(path, ARCHITECTURES.get("sdxl"), shapes=shapes_of(tiny_sdxl_models["c"]))

    with open_safetensors(path) as written:
        names = {key.rsplit(".", 2 if key.endswith(".weight") else 1)[0] for key in written.keys()}
        metadata = dict(written.metadata)
        conv_down = written.info("lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight").shape
        conv_up = written.info("lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight").shape
    assert lora.format == "kohya"
    assert {name.split("_")[1] for name in names} == {"unet", "te1", "te2"}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names  # SDXL: original names
    assert "lora_te2_text_model_encoder_layers_0_self_attn_v_proj" in names
    assert len(conv_down) == 4 and conv_down[2:] == (3, 3) and conv_up[2:] == (1, 1)  # kohya LoCon shapes
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["note"] == "test"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert len(lora.keys()) == len({layer.key for layer in extraction.layers})
    for layer in extraction.layers:  # the same deltas as the layers extracted
        (read,) = [found for found in lora.layers[layer.key] if found.rows == layer.rows]
        assert read.scale == 1.0
        torch.testing.assert_close(read.up, layer.up)
        torch.testing.assert_close(read.down, layer.down)


def test_only_the_chosen_blocks_are_extracted(tiny_models: dict[str, Path]) -> None:
    arch = ARCHITECTURES.get("sd1")
    with open_model(tiny_models["c"]) as a, open_model(tiny_models["a"]) as b:
        extraction = extract_lora(a.checkpoint, b.checkpoint, arch, rank=2, blocks={"OUT05", "M00"})
    assert {arch.block_of(layer.key, torch.float16) for layer in extraction.layers} == {"M00", "OUT05"}
    assert list(extraction.kept_energy) == ["M00", "OUT05"]


def test_extraction_refuses_an_unknown_block_and_a_rank_below_one(tiny_models: dict[str, Path]) -> None:
    with open_model(tiny_models["c"]) as a, open_model(tiny_models["a"]) as b:
        with pytest.raises(
            ConfigError, match=r"block 'IN4' is not a block of Stable Diffusion 1\.x \(did you mean 'IN04'"
        ):
            extract_lora(a.checkpoint, b.checkpoint, a.arch, rank=4, blocks=["IN4"])
        with pytest.raises(ConfigError, match="rank must be a whole number of at least 1, got 0"):
            extract_lora(a.checkpoint, b.checkpoint, a.arch, rank=0)


def test_the_randomized_svd_finds_the_top_singular_values() -> None:
    generator = torch.Generator().manual_seed(0)
    left = torch.linalg.qr(torch.randn(600, 300, generator=generator)).Q
    right = torch.linalg.qr(torch.randn(400, 300, generator=generator)).Q
    sigma = 0.8 ** torch.arange(300, dtype=torch.float32)
    matrix = (left * sigma) @ right.T  # σ_k = 0.8^k

    u, s, vh = truncated_svd(matrix, 16, generator=torch.Generator().manual_seed(1))

    torch.testing.assert_close(s, sigma[:16], rtol=1e-4, atol=1e-6)
    exact = torch.linalg.svd(matrix, full_matrices=False)
    best = (exact.U[:, :16] * exact.S[:16]) @ exact.Vh[:16]
    torch.testing.assert_close((u * s) @ vh, best, rtol=0, atol=1e-4)


def test_cli_extract_lora_prints_the_kept_energy_and_writes_a_kohya_lora(
    capsys: pytest.CaptureFixture[str], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "diff.safetensors"
    result = run_cli(
        capsys, "extract-lora", tiny_models["c"], tiny_models["a"], "-o", out, "--rank", "4",
        "--blocks", "IN04,OUT05", "--blocks", "BASE",
    )  # fmt: skip
    assert result.code == 0, result.err
    rows = [line for line in result.out.splitlines() if line.startswith(("│ BASE", "│ IN04", "│ OUT05"))]
    assert len(rows) == 3 and all("%" in row for row in rows)
    assert "wrote" in result.out
    lora = read_lora(out, ARCHITECTURES.get("sd1"), shapes=shapes_of(tiny_models["c"]))
    assert max(layer.rank for layers in lora.layers.values() for layer in layers) == 4
    with open_safetensors(out) as written:
        assert written.metadata["ss_network_dim"] == "4" and written.metadata["ss_network_alpha"] == "4.0"
        assert '"a": "base.safetensors"' in written.metadata["automerge.extract_lora"]
        assert (
            written.info(next(k for k in written.keys() if k.endswith("lora_up.weight"))).dtype
            == torch.float16
        )
        assert "lora_unet_down_blocks_1_attentions_0_proj_in.alpha" in written.keys()  # SD1: diffusers names


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--rank", "0"], "--rank must be at least 1, got 0"),
        (["--blocks", "IN04,OUT99"], "--blocks: 'OUT99' is not a block of Stable Diffusion 1.x"),
        (["--dtype", "fp8"], "--dtype must be one of fp16, bf16, fp32, got 'fp8'"),
        (["--device", "tpu"], "--device: 'tpu' is not"),
    ],
)
def test_cli_extract_lora_refuses_bad_options_in_one_line(
    options: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    tiny_models: dict[str, Path],
    tmp_path: Path,
) -> None:
    out = tmp_path / "x.safetensors"
    result = run_cli(capsys, "extract-lora", tiny_models["c"], tiny_models["a"], "-o", out, *options)
    assert result.code == 2
    assert message in result.err and len(result.err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_extract_lora_refuses_models_of_two_families(
    capsys: pytest.CaptureFixture[str],
    tiny_models: dict[str, Path],
    tiny_sdxl_models: dict[str, Path],
    tmp_path: Path,
) -> None:
    result = run_cli(
        capsys, "extract-lora", tiny_models["c"], tiny_sdxl_models["a"], "-o", tmp_path / "x.safetensors"
    )
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "is Stable Diffusion 1.x but" in result.err and "Stable Diffusion XL base" in result.err
    assert "a difference LoRA needs two models of one family" in result.err


def test_cli_extract_lora_refuses_two_identical_models(
    capsys: pytest.CaptureFixture[str], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    result = run_cli(
        capsys, "extract-lora", tiny_models["a"], tiny_models["a"], "-o", tmp_path / "x.safetensors"
    )
    assert result.code == 2 and "there is no difference to extract" in result.err


def test_extraction_refuses_non_finite_weights(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    key = "model.diffusion_model.middle_block.1.proj_out.weight"
    with open_safetensors(tiny_models["a"]) as source:
        tensors = {name: source.load(name) for name in source.keys()}
        metadata = dict(source.metadata)
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    save_safetensors(tmp_path / "broken.safetensors", tensors, metadata=metadata)
    with open_model(tiny_models["c"]) as a, open_model(tmp_path / "broken.safetensors") as b:
        with pytest.raises(ConfigError, match=f"'{key}' holds NaN or infinite values"):
            extract_lora(a.checkpoint, b.checkpoint, a.arch, rank=2, blocks=["M00"])


def test_writing_refuses_a_layer_kohya_loras_do_not_have(tmp_path: Path) -> None:
    key = "model.diffusion_model.time_embed.0.weight"
    layer = LoraLayer(key, torch.zeros(1280, 1), torch.zeros(1, 320), 1.0, None)
    with pytest.raises(ConfigError, match=f"cannot write a LoRA layer for '{key}'"):
        write_kohya_lora(tmp_path / "x.safetensors", [layer], ARCHITECTURES.get("sd1"))
    with pytest.raises(ConfigError, match="no LoRA layers to write"):
        write_kohya_lora(tmp_path / "x.safetensors", [], ARCHITECTURES.get("sd1"))
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_extract_lora_never_writes_over_a_source(
    capsys: pytest.CaptureFixture[str], tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """-o naming model B (by another path) would have replaced it by the atomic rename."""
    import shutil

    b = shutil.copy(tiny_models["a"], tmp_path / "b.safetensors")
    before = Path(b).read_bytes()
    link = tmp_path / "same.safetensors"
    link.symlink_to(b)
    result = run_cli(capsys, "extract-lora", tiny_models["c"], b, "-o", link)
    assert result.code == 2 and "is the model" in result.err and len(result.err.strip().splitlines()) == 1
    assert Path(b).read_bytes() == before
