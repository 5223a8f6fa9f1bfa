"""The command line end to end: ``automerge render`` (checkpoints and recipes), ``automerge score`` and
``automerge rewards fetch``, through the real entry point, on tiny models and tiny reward models."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cli_helpers import CliResult, run_cli
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from automerge.rewards import load_reward
from automerge.testing.tiny_rewards import TINY_REWARDS

PROMPTS = ("a photo of a cat", "a red house in the tree")
PAYLOAD = {
    "defaults": {"steps": 2, "cfg": 5.0, "width": 64, "height": 64, "seeds": [1, 2]},
    "items": [{"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1], "negative_prompt": "blurry", "seeds": [3]}],
}
KEYS = ("i00-s0001", "i00-s0002", "i01-s0003")
SEEDS = (1, 2, 3)
SETTINGS = {"cfg": 5.0, "clip_skip": 1, "height": 64, "scheduler": "euler", "steps": 2, "width": 64}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One torch thread here and in the fresh process: the tiny models gain nothing from more."""
    threads = torch.get_num_threads()
    previous = os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if previous is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = previous


def _write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_yaml(tmp_path_factory.mktemp("payload") / "payload.yaml", PAYLOAD)


@pytest.fixture(scope="module")
def models(tiny_models: dict[str, Path], tiny_sdxl_models: dict[str, Path]) -> dict[str, Path]:
    return {"sd1": tiny_models["a"], "sdxl": tiny_sdxl_models["a"]}


def _render(capsys: pytest.CaptureFixture[str], model: Path, payload: Path, out: Path, *extra: str) -> None:
    result = run_cli(capsys, "render", model, payload, "-o", out, "--device", "cpu", *extra)
    assert result.code == 0, result.err
    assert f"wrote {len(KEYS)} images" in result.out


@pytest.fixture(scope="module")
def rendered_cache(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {}


@pytest.fixture()
def rendered_by_cli(
    rendered_cache: dict[str, Path],
    models: dict[str, Path],
    payload: Path,
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
) -> Callable[[str], Path]:
    """``automerge render MODEL PAYLOAD --batch-size 4`` once per family per module: its out folder."""

    def render_once(family: str) -> Path:
        if family not in rendered_cache:
            out = tmp_path_factory.mktemp(f"rendered-{family}")
            _render(capsys, models[family], payload, out, "--batch-size", "4")
            rendered_cache[family] = out
        return rendered_cache[family]

    return render_once


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    """Every PNG of ``folder`` as an (H, W, 3) uint8 array, by file stem."""
    return {path.stem: np.asarray(Image.open(path).convert("RGB")) for path in sorted(folder.glob("*.png"))}


def _assert_same_pixels(first: dict[str, np.ndarray], second: dict[str, np.ndarray]) -> None:
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def _one_line_error(result: CliResult) -> str:
    assert result.code == 2, (result.out, result.err)
    assert "Traceback" not in result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    return lines[0]


# -- render --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_render_writes_pngs_named_by_key_with_their_prompt_seed_and_settings(
    family: str, rendered_by_cli: Callable[[str], Path]
) -> None:
    folder = rendered_by_cli(family)
    paths = sorted(folder.iterdir())
    assert [p.name for p in paths] == [f"{key}.png" for key in KEYS]  # no temp files left
    for path, seed, prompt in zip(paths, SEEDS, (PROMPTS[0], PROMPTS[0], PROMPTS[1]), strict=True):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (64, 64)
            text = dict(image.text)
        assert text["key"] == path.stem
        assert text["prompt"] == prompt
        assert text["seed"] == str(seed)
        assert json.loads(text["settings"]) == SETTINGS
    assert text["negative_prompt"] == "blurry"
    pixels = _pixels(folder)
    assert not np.array_equal(pixels[KEYS[0]], pixels[KEYS[1]])  # the seed matters
    assert all(image.std() > 0 for image in pixels.values())  # not blank


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_render_twice_and_in_a_fresh_process_gives_identical_pixels(
    family: str,
    models: dict[str, Path],
    payload: Path,
    rendered_by_cli: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = _pixels(rendered_by_cli(family))
    if family == "sd1":  # twice in this process; a fresh process: test_render_pipeline.py's test
        _render(capsys, models[family], payload, tmp_path / "second")
        _assert_same_pixels(first, _pixels(tmp_path / "second"))
        return
    # SDXL: a second render in a fresh process (the stronger check: no state shared with the first)
    fresh = subprocess.run(
        [
            sys.executable,
            "-c",
            "from automerge.cli import main; main()",
            "render",
            str(models[family]),
            str(payload),
            "-o",
            str(tmp_path / "fresh"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert fresh.returncode == 0, fresh.stderr
    assert set(first) == set(KEYS)
    _assert_same_pixels(first, _pixels(tmp_path / "fresh"))


def test_render_one_by_one_matches_batched_to_one_8_bit_level(
    models: dict[str, Path],
    payload: Path,
    rendered_by_cli: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--batch-size`` reaches the renderer; BLAS kernels that block by batch size may move a pixel
    by one level (tests/render: bit-exact on most CPUs)."""
    _render(capsys, models["sd1"], payload, tmp_path / "single", "--batch-size", "1")
    batched, single = _pixels(rendered_by_cli("sd1")), _pixels(tmp_path / "single")
    assert batched.keys() == single.keys() == set(KEYS)
    for key in KEYS:
        assert np.abs(batched[key].astype(int) - single[key].astype(int)).max() <= 1, key


def _files(*folders: Path) -> set[Path]:
    return {path for folder in folders for path in folder.rglob("*") if path.is_file()}


def test_render_recipe_merges_in_memory_and_writes_no_checkpoint(
    tiny_models: dict[str, Path],
    payload: Path,
    rendered_by_cli: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    recipe = _write_yaml(
        tmp_path / "recipe" / "recipe.yaml",
        {
            "models": {"a": str(tiny_models["a"]), "b": str(tiny_models["b"])},
            "method": "weighted_sum",
            "params": {"alpha": 0.5},
            "dtype": "fp32",
        },
    )
    model_folder = tiny_models["a"].parent
    before = _files(tmp_path, model_folder)
    _render(capsys, recipe, payload, tmp_path / "merged")
    written = _files(tmp_path, model_folder) - before
    assert written == {tmp_path / "merged" / f"{key}.png" for key in KEYS}
    merged = _pixels(tmp_path / "merged")
    # The in-memory merge renders what the same recipe merged to a file renders.
    file = tmp_path / "file" / "merged.safetensors"
    file.parent.mkdir()
    assert run_cli(capsys, "merge", recipe, "-o", file).code == 0
    _render(capsys, file, payload, tmp_path / "from-file")
    _assert_same_pixels(merged, _pixels(tmp_path / "from-file"))
    pure_a = _pixels(rendered_by_cli("sd1"))  # tiny model a alone
    assert all(np.abs(merged[k].astype(int) - pure_a[k].astype(int)).max() > 2 for k in KEYS)


# -- score ---------------------------------------------------------------------------------------------


@pytest.fixture()
def rendered(rendered_by_cli: Callable[[str], Path]) -> Path:
    """The payload rendered by ``automerge render`` with tiny SD1 model a."""
    return rendered_by_cli("sd1")


@pytest.mark.parametrize(("metric", "best"), [("ssim", 1.0), ("mse", 0.0)])
def test_score_against_the_folder_itself_gives_the_best_score(
    metric: str, best: float, rendered: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = _write_yaml(
        tmp_path / "reference.yaml",
        {"reward": "reference", "options": {"metric": metric, "directory": str(rendered)}},
    )
    result = run_cli(capsys, "score", manifest, rendered, "--json")
    assert result.code == 0, result.err
    lines = [json.loads(line) for line in result.out.strip().splitlines()]
    assert [line["key"] for line in lines] == list(KEYS)
    assert [line["seed"] for line in lines] == list(SEEDS)
    assert [line["score"] for line in lines] == [best] * len(KEYS)
    assert all(line["raw"] == {"reference": best} for line in lines)
    table = run_cli(capsys, "score", manifest, rendered)
    assert table.code == 0, table.err
    for key in KEYS:
        assert key in table.out
    assert f"mean: {best:.6g} over {len(KEYS)} images" in table.out


def test_score_with_a_tiny_clip_score_model_reads_prompts_from_the_pngs(
    rendered: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = TINY_REWARDS["clip-score"](tmp_path / "clip")
    result = run_cli(capsys, "score", manifest, rendered, "--json")
    assert result.code == 0, result.err
    lines = [json.loads(line) for line in result.out.strip().splitlines()]
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1]]
    assert [line["prompt"] for line in lines] == prompts
    images = [Image.open(rendered / f"{key}.png").convert("RGB") for key in KEYS]
    expected = load_reward(manifest).score(images, prompts).scores
    assert [line["score"] for line in lines] == pytest.approx(expected, abs=1e-6)
    assert lines[0]["score"] != lines[2]["score"]


# -- errors --------------------------------------------------------------------------------------------


def test_payload_size_not_a_multiple_of_8_is_one_line_naming_the_file_and_field(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _write_yaml(
        tmp_path / "bad-payload.yaml", {**PAYLOAD, "defaults": {**PAYLOAD["defaults"], "width": 100}}
    )
    line = _one_line_error(run_cli(capsys, "render", models["sd1"], bad, "-o", tmp_path / "out"))
    assert "bad-payload.yaml" in line and "width" in line and "multiple of 8" in line
    assert not (tmp_path / "out").exists()


def test_batch_size_below_1_is_one_line_error(
    models: dict[str, Path], payload: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(capsys, "render", models["sd1"], payload, "-o", tmp_path / "out", "--batch-size", "0")
    assert "--batch-size" in _one_line_error(result) and "0" in result.err
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_cannot_be_created_is_one_line_error(
    models: dict[str, Path], payload: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = _one_line_error(run_cli(capsys, "render", models["sd1"], payload, "-o", blocker / "pngs"))
    assert "a-file/pngs" in line and "-o" in line


@pytest.fixture(scope="module")
def tiny_imagereward(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ImageReward folder (file roles: model, med_config, vocab); tests copy its manifest."""
    return TINY_REWARDS["imagereward"](tmp_path_factory.mktemp("imagereward")).parent


_IR_FILES = {"model": "ImageReward.pt", "med_config": "med_config.json", "vocab": "vocab.txt"}


def _imagereward_manifest(folder: Path, path: Path, **changes: object) -> Path:
    """The tiny manifest (absolute weight paths, its tiny ``options.vision``) with ``changes``."""
    data = yaml.safe_load((folder / "imagereward.yaml").read_text(encoding="utf-8"))
    data["weights"] = {role: str(folder / name) for role, name in _IR_FILES.items()}
    del data["hub"]
    return _write_yaml(path, {**data, **changes})


def test_missing_reward_weights_file_is_one_line_naming_the_file_and_the_fetch(
    tiny_imagereward: Path, rendered: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = _imagereward_manifest(
        tiny_imagereward,
        tmp_path / "imagereward.yaml",
        weights={
            **{role: str(tiny_imagereward / name) for role, name in _IR_FILES.items()},
            "model": str(tmp_path / "absent" / "ImageReward.pt"),
        },
        hub={"model": {"repo": "THUDM/ImageReward", "files": ["ImageReward.pt"]}},
    )
    line = _one_line_error(run_cli(capsys, "score", manifest, rendered))
    assert str(tmp_path / "absent" / "ImageReward.pt") in line
    assert "automerge rewards fetch imagereward" in line and "THUDM/ImageReward" in line


def test_sha256_mismatch_is_one_line_naming_the_file_and_both_hashes(
    tiny_imagereward: Path, rendered: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = "0" * 64
    manifest = _imagereward_manifest(tiny_imagereward, tmp_path / "ir.yaml", sha256={"vocab": wrong})
    line = _one_line_error(run_cli(capsys, "score", manifest, rendered))
    assert "sha256 mismatch" in line and str(tiny_imagereward / "vocab.txt") in line
    found = hashlib.sha256((tiny_imagereward / "vocab.txt").read_bytes()).hexdigest()
    assert f"expected {wrong}, found {found}" in line


def test_score_with_the_unaltered_tiny_imagereward_manifest_works(
    tiny_imagereward: Path, rendered: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The control for the two error tests above: the same manifest without the fault scores."""
    manifest = _imagereward_manifest(tiny_imagereward, tmp_path / "ir.yaml")
    result = run_cli(capsys, "score", manifest, rendered, "--json")
    assert result.code == 0, result.err
    assert len(result.out.strip().splitlines()) == len(KEYS)


def test_score_takes_a_manifest_name_and_prints_small_scores_with_significant_digits(
    rendered_by_cli: Callable[[str], Path],
    tiny_imagereward: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`score imagereward DIR` said "file not found" while `rewards fetch imagereward` took the name;
    and an MSE near 1e-7 printed as -0.0000 ("mean: -0.0000")."""
    _imagereward_manifest(tiny_imagereward, tmp_path / "rewards" / "tinyir.yaml")
    reference = rendered_by_cli("sd1")
    other = tmp_path / "other"
    shutil.copytree(reference, other)
    first = sorted(other.glob("*.png"))[0]  # one pixel off by one level: an MSE of ~1e-7
    with Image.open(first) as image:
        pixels = np.array(image)
        info = PngInfo()
        for key, value in image.text.items():
            info.add_text(key, value)
    pixels[0, 0, 0] = pixels[0, 0, 0] + 1 if pixels[0, 0, 0] < 255 else 254
    Image.fromarray(pixels).save(first, pnginfo=info)
    _write_yaml(
        tmp_path / "rewards" / "ref.yaml",
        {"reward": "reference", "options": {"metric": "mse", "directory": str(reference)}},
    )
    monkeypatch.chdir(tmp_path)
    named = run_cli(capsys, "score", "tinyir", str(reference), "--json")
    assert named.code == 0, named.err
    table = run_cli(capsys, "score", "ref", str(other))
    assert table.code == 0, table.err
    assert "-0.0000" not in table.out
    mean = float(re.search(r"mean: (\S+) over", table.out).group(1))
    assert mean < 0 and mean == pytest.approx(
        -1 / (255**2 * 3 * pixels.shape[0] * pixels.shape[1] * len(KEYS)), rel=1e-3
    )


# -- rewards fetch -------------------------------------------------------------------------------------


def _fetchable_manifest(folder: Path) -> Path:
    return _write_yaml(
        folder / "rewards" / "tinyir.yaml",
        {
            "reward": "imagereward",
            "weights": {role: f"weights/{name}" for role, name in _IR_FILES.items()},
            "hub": {
                "model": {"repo": "THUDM/ImageReward", "files": ["ImageReward.pt"]},
                "med_config": {"repo": "THUDM/ImageReward", "files": ["med_config.json"]},
                "vocab": {"repo": "google-bert/bert-base-uncased", "files": ["vocab.txt"]},
            },
        },
    )


@pytest.mark.parametrize("hub_offline", [True, False], ids=["hf-offline", "sockets-blocked"])
def test_rewards_fetch_offline_says_which_file_to_put_where(
    hub_offline: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline (HF_HUB_OFFLINE), or online mode against blocked sockets, the fetch fails at once."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", hub_offline)
    monkeypatch.chdir(tmp_path)
    _fetchable_manifest(tmp_path)
    line = _one_line_error(run_cli(capsys, "rewards", "fetch", "tinyir"))
    target = Path("rewards") / "weights" / "ImageReward.pt"
    assert "cannot download ImageReward.pt from the hub repo THUDM/ImageReward" in line
    assert f"put ImageReward.pt from THUDM/ImageReward at {target}" in line
    assert ("LocalEntryNotFoundError" if hub_offline else "NetworkBlockedError") in line  # the path taken
    assert not target.exists()


def test_rewards_fetch_unknown_name_lists_the_known_manifests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _fetchable_manifest(tmp_path)
    line = _one_line_error(run_cli(capsys, "rewards", "fetch", "imagerewrd"))
    assert "no reward manifest 'imagerewrd'" in line and "tinyir" in line
