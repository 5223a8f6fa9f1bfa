"""The live modules' parameter names for the completeness check, cached on disk: the same names as the
modules built, and a merge that finds them cached does not import diffusers or transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from automerge.arch import ARCHITECTURES, parameters
from automerge.files import CACHE_DIR_VARIABLE
from automerge.tiny import make_tiny_state_dict


def tiny_configs(family: str) -> dict:
    return dict(ARCHITECTURES.get(family).tiny_configs)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "cache"))
    parameters.clear_memory_cache()
    yield tmp_path / "cache" / parameters.CACHE_FOLDER
    parameters.clear_memory_cache()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_names_are_the_built_modules_names_fresh_and_from_the_file(family: str, cache: Path) -> None:
    configs = tiny_configs(family)
    fresh = parameters.live_parameters(configs)
    assert fresh == parameters._built(configs)
    assert "down_blocks.0.resnets.0.time_emb_proj.bias" in fresh["unet"].names
    assert len(list(cache.glob("*.json"))) == 1
    parameters.clear_memory_cache()
    assert parameters.live_parameters(configs) == fresh


def test_a_damaged_cache_file_is_rebuilt(cache: Path) -> None:
    configs = tiny_configs("sd1")
    expected = parameters.live_parameters(configs)
    (path,) = cache.glob("*.json")
    for damage in ["{not json", json.dumps({"format": 1, "components": {"unet": {"names": [1]}}}), "[]"]:
        path.write_text(damage)
        parameters.clear_memory_cache()
        assert parameters.live_parameters(configs) == expected
        assert json.loads(path.read_text())["format"] == parameters.CACHE_FORMAT


def test_another_library_version_is_another_file(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configs = tiny_configs("sd1")
    parameters.live_parameters(configs)
    monkeypatch.setattr(parameters, "_library_versions", lambda: {"diffusers": "0.0.0-other"})
    parameters.clear_memory_cache()
    parameters.live_parameters(configs)
    assert len(list(cache.glob("*.json"))) == 2


def test_an_unwritable_cache_still_answers(cache: Path) -> None:
    cache.parent.mkdir(parents=True)
    cache.write_text("a file where the folder should be")
    configs = tiny_configs("sd1")
    assert parameters.live_parameters(configs) == parameters._built(configs)


def test_unfed_parameters_names_what_no_key_feeds(cache: Path) -> None:
    arch = ARCHITECTURES.get("sd1")
    configs = tiny_configs("sd1")
    keys = list(make_tiny_state_dict(arch, seed=0))
    assert parameters.unfed_parameters(arch, configs, keys) == {}
    dropped = "model.diffusion_model.input_blocks.1.0.emb_layers.1.bias"
    missing = parameters.unfed_parameters(arch, configs, [key for key in keys if key != dropped])
    assert missing == {"unet": ["down_blocks.0.resnets.0.time_emb_proj.bias"]}


def test_a_cached_check_imports_neither_diffusers_nor_transformers(tmp_path: Path) -> None:
    """The first check builds the modules (and writes the file); a later process only reads it."""
    code = (
        "import sys\n"
        "from automerge.arch import ARCHITECTURES, parameters\n"
        "arch = ARCHITECTURES.get('sd1')\n"
        "parameters.unfed_parameters(arch, dict(arch.tiny_configs), [])\n"
        "print(sorted(name for name in ('diffusers', 'transformers') if name in sys.modules))\n"
    )
    env = {**os.environ, CACHE_DIR_VARIABLE: str(tmp_path / "cache")}
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert first.stdout.strip() == "['diffusers', 'transformers']"
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert second.stdout.strip() == "[]"
