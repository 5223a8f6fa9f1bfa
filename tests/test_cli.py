"""The command line: help, inspect, tiny, merge, and errors as one line with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_helpers import run_cli
from safetensors.torch import load_file, save_file

from automerge import cli
from automerge.tiny import write_tiny


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "--help")
    assert result.code == 0
    for command in ("inspect", "tiny", "merge", "methods"):
        assert command in result.out


def test_the_command_shortens_openmp_spinning_unless_the_user_set_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's idle OpenMP workers spin for a while after each parallel op; during an export they
    took ~10 % of the CPU from the C kernel's threads at real size. The command sets a short spin
    before torch loads, and leaves a value the user set."""
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert run_cli(capsys, "--help").code == 0
    assert os.environ["GOMP_SPINCOUNT"] == cli.PROCESS_DEFAULTS["GOMP_SPINCOUNT"]
    monkeypatch.setenv("GOMP_SPINCOUNT", "123")
    assert run_cli(capsys, "--help").code == 0
    assert os.environ["GOMP_SPINCOUNT"] == "123"


def test_loading_the_command_does_not_load_torch() -> None:
    """The spin setting only takes effect if torch (and its OpenMP) loads after it."""
    code = "import sys, automerge.cli; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize(("family", "blocks"), [("sd1", 27), ("sd2", 27), ("sdxl", 21)])
def test_inspect_json_on_each_tiny_family(
    family: str, blocks: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / f"{family}.safetensors"
    assert run_cli(capsys, "tiny", family, path).code == 0
    result = run_cli(capsys, "inspect", path, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["arch"] == family and report["layout"] == "original"
    assert len(report["blocks"]) == blocks
    assert all(b["tensors"] > 0 for b in report["blocks"].values())
    assert any(k.endswith("alphas_cumprod") for k in report["unmerged"])


def test_inspect_table(tiny_models: dict, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "inspect", tiny_models["a"])
    assert result.code == 0
    assert "OUT11" in result.out and "Stable Diffusion 1.x" in result.out


def test_inspect_reads_headers_only(
    tiny_models: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file whose tensor data is garbage still inspects: no tensor data is read."""
    data = bytearray(tiny_models["a"].read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    data[header_end:] = b"\xff" * (len(data) - header_end)
    path = tmp_path / "garbage-data.safetensors"
    path.write_bytes(bytes(data))
    assert run_cli(capsys, "inspect", path, "--json").code == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":', "header"),
        (None, "does not exist"),
    ],
)
def test_corrupt_checkpoints_fail_with_one_line_and_exit_2(
    content: bytes | None, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.safetensors"
    if content is not None:
        path.write_bytes(content)
    result = run_cli(capsys, "inspect", path)
    assert result.code == 2
    assert message in result.err and "Traceback" not in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_truncated_checkpoint_is_an_error(
    tiny_models: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cut.safetensors"
    path.write_bytes(tiny_models["a"].read_bytes()[:100_000])
    result = run_cli(capsys, "inspect", path)
    assert result.code == 2 and "cut.safetensors" in result.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tiny", "sd1", "-o", "x.safetensors"], "No such option: -o"),
        (["inspect"], "Missing argument"),
        (["no-such-command"], "No such command"),
        (["tiny", "sd1", "x.safetensors", "--seed", "many"], "Invalid value for '--seed'"),
    ],
)
def test_usage_errors_are_a_short_message_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(capsys, *args)
    assert result.code == 2
    assert message in result.err and "Traceback" not in result.err
    assert "--help" in result.err  # the usage line points at the help


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from automerge.errors import CheckpointError

    with pytest.raises(CheckpointError):
        run_cli(capsys, "--debug", "inspect", tmp_path / "missing.safetensors")


# -- merge -------------------------------------------------------------------------------------------


def _write_recipe(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _models(tiny_models: dict, *names: str) -> dict[str, str]:
    return {n: str(tiny_models[n]) for n in names}


def test_merge_writes_a_checkpoint(
    tiny_models: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _write_recipe(
        tmp_path,
        {
            "models": _models(tiny_models, "a", "b", "c"),
            "method": "add_difference",
            "params": {"alpha": {"default": 0.5, "IN00": 0.1, "OUT11": 0.9}},
        },
    )
    out = tmp_path / "out.safetensors"
    result = run_cli(capsys, "merge", recipe, "-o", out, "--dtype", "bf16")
    assert result.code == 0, result.err
    tensors = load_file(out)
    assert str(tensors["model.diffusion_model.out.2.weight"].dtype) == "torch.bfloat16"


def _mismatched(tiny_models: dict, tmp_path: Path) -> str:
    tensors = load_file(tiny_models["b"])
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    tensors[key] = tensors[key][:, :4].contiguous()
    path = tmp_path / "narrow.safetensors"
    save_file(tensors, path)
    return str(path)


BAD_RECIPES = [
    (
        {"method": "weighted_summ"},
        "recipe.yaml: field 'method': unknown merge method 'weighted_summ' (did you mean 'weighted_sum'?)",
    ),
    (
        {"method": "weighted_sum", "params": {"alfa": 0.5}},
        "takes no parameter 'alfa' (did you mean 'alpha'?)",
    ),
    ({"method": "weighted_sum", "params": {"alpha": {"IN12": 0.5}}}, "IN12"),
    ({"method": "weighted_sum", "params": {"alpha": {"default": 0.5, "IN04": 1.3}}}, "1.3"),
    ({"method": "add_difference", "models": ["a", "b"]}, "needs a base model"),
    ({"method": "weighted_sum", "colour": "red"}, "unknown key 'colour'"),
]


@pytest.mark.parametrize(("changes", "message"), BAD_RECIPES)
def test_bad_recipes_fail_cleanly(
    changes: dict, message: str, tiny_models: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = {"models": _models(tiny_models, *changes.pop("models", ["a", "b"])), **changes}
    out = tmp_path / "out.safetensors"
    result = run_cli(capsys, "merge", _write_recipe(tmp_path, data), "-o", out)
    assert result.code == 2, result.err
    assert message in result.err and "Traceback" not in result.err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_mixed_families_and_shape_mismatch_fail_before_writing(
    tiny_models: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    xl = write_tiny("sdxl", tmp_path / "xl.safetensors")
    cases = [
        ({"a": str(tiny_models["a"]), "b": str(xl)}, "different families"),
        ({"a": str(tiny_models["a"]), "b": _mismatched(tiny_models, tmp_path)}, "shape mismatch"),
    ]
    for models, message in cases:
        out = tmp_path / "out.safetensors"
        result = run_cli(
            capsys, "merge", _write_recipe(tmp_path, {"models": models, "method": "weighted_sum"}), "-o", out
        )
        assert result.code == 2 and message in result.err, result.err
        assert not out.exists()


def test_ctrl_c_outside_the_trial_loop_exits_130_with_one_line(monkeypatch, capsys, tmp_path) -> None:
    """click hands Ctrl-C back as a return value (130) when not in standalone mode; it was dropped,
    so an interrupted `automerge merge` exited 0."""
    from cli_helpers import run_cli

    import automerge.merge

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(automerge.merge, "load_recipe", interrupted)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("models: {a: a.safetensors}\\n")
    result = run_cli(capsys, "merge", recipe, "-o", tmp_path / "out.safetensors")
    assert result.code == 130
    assert result.err.strip() == "interrupted"
    assert not (tmp_path / "out.safetensors").exists()


def test_errors_print_user_text_literally(capsys, tmp_path) -> None:
    """Brackets in file names are not rich markup: `model [fp16].safetensors` lost its `[fp16]`, and a
    `[/x]` crashed the printer."""
    from cli_helpers import run_cli

    for name in ("model [fp16].safetensors", "odd [/x] name.safetensors"):
        result = run_cli(capsys, "inspect", tmp_path / name)
        assert result.code == 2
        assert name in result.err and result.err.count("\n") == 1, result.err


def test_merge_refuses_to_write_over_one_of_its_sources(capsys, tmp_path, tiny_models) -> None:
    """-o equal to model a (by path or through a link) silently replaced the user's model."""
    import shutil

    from cli_helpers import run_cli

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    shutil.copy(tiny_models["a"], a)
    shutil.copy(tiny_models["b"], b)
    (tmp_path / "link.safetensors").symlink_to(a)
    (tmp_path / "sub").mkdir()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "models: {a: a.safetensors, b: b.safetensors}\nmethod: weighted_sum\nparams: {alpha: 0.5}\n"
    )
    before = a.read_bytes()
    for out in (a, tmp_path / "link.safetensors", tmp_path / "sub" / ".." / "b.safetensors"):
        result = run_cli(capsys, "merge", recipe, "-o", out)
        assert result.code == 2 and "itself; write the merge to another path" in result.err, result.err
    assert a.read_bytes() == before


def test_inspect_counts_every_tensor_parameter_and_ema_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The numbers of ``inspect --json`` against the file itself: dtypes over every tensor, parameters
    over the exported ones, each block's share, the EMA copies counted apart."""
    from collections import Counter

    import torch

    tensors = load_file(str(write_tiny("sd1", tmp_path / "a.safetensors", seed=1)))
    tensors["model_ema.diffusion_modelinput_blocks00weight"] = torch.zeros(3, 2, dtype=torch.float32)
    tensors["model_ema.decay"] = torch.tensor(0.999, dtype=torch.float32)
    path = tmp_path / "with-ema.safetensors"
    save_file(tensors, str(path))
    result = run_cli(capsys, "inspect", path, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    exported = {k: v for k, v in tensors.items() if not k.startswith("model_ema.")}
    assert report["path"] == str(path) and report["ema_tensors"] == 2
    assert report["dtypes"] == dict(
        sorted(Counter(str(v.dtype).removeprefix("torch.") for v in tensors.values()).items())
    )
    assert report["params"] == sum(v.numel() for v in exported.values())
    in_blocks = sum(b["params"] for b in report["blocks"].values())
    assert in_blocks + sum(exported[k].numel() for k in report["unmerged"]) == report["params"]
    assert sum(b["tensors"] for b in report["blocks"].values()) + len(report["unmerged"]) == len(exported)
    unet_in00 = [k for k in exported if k.startswith("model.diffusion_model.input_blocks.0.")]
    assert report["blocks"]["IN00"]["tensors"] >= len(unet_in00) > 0
