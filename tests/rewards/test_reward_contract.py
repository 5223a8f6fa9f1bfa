"""The contract every registered reward plug-in meets, run on its tiny model."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from automerge.errors import RewardError
from automerge.rewards import REWARDS, RewardModel, load_reward
from automerge.rewards.base import RewardPlugin
from automerge.testing.tiny_rewards import TINY_REWARDS


def test_every_registered_plugin_has_a_tiny_model_writer() -> None:
    assert sorted(TINY_REWARDS) == REWARDS.names()


@pytest.mark.parametrize("name", REWARDS.names())
def test_plugin_scores_one_finite_float_per_image_deterministically(
    name: str,
    tiny_manifests: dict[str, Path],
    images: list[Image.Image],
    prompts: tuple[str, ...],
    keys: tuple[str, ...],
) -> None:
    reward = load_reward(tiny_manifests[name])
    first = reward.score(images, prompts, keys=keys)
    second = reward.score(images, prompts, keys=keys)
    assert isinstance(reward.model, RewardModel)
    assert len(first.scores) == 2 and all(math.isfinite(score) for score in first.scores)
    assert first.scores == second.scores  # same inputs → same bits
    assert first.scores[0] != first.scores[1]
    assert first.components[0].name == name and first.components[0].raw == first.scores


@pytest.mark.parametrize("name", REWARDS.names())
def test_plugin_rejects_a_prompt_count_that_differs_from_the_image_count(
    name: str,
    tiny_manifests: dict[str, Path],
    images: list[Image.Image],
    prompts: tuple[str, ...],
    keys: tuple[str, ...],
) -> None:
    reward = load_reward(tiny_manifests[name])
    with pytest.raises(RewardError, match="2 images but 1 prompts"):
        reward.score(images, prompts[:1], keys=keys)


@pytest.mark.parametrize("name", REWARDS.names())
def test_plugin_scores_in_bf16_close_to_fp32(
    name: str,
    tiny_manifests: dict[str, Path],
    images: list[Image.Image],
    prompts: tuple[str, ...],
    keys: tuple[str, ...],
    tmp_path: Path,
) -> None:
    source = tiny_manifests[name]
    data = yaml.safe_load(source.read_text())
    data["weights"] = {role: str(source.parent / path) for role, path in data.get("weights", {}).items()}
    if "directory" in data.get("options", {}):
        data["options"]["directory"] = str(source.parent / data["options"]["directory"])
    manifest = tmp_path / source.name
    manifest.write_text(yaml.safe_dump({**data, "dtype": "bf16"}))
    fp32 = load_reward(source).score(images, prompts, keys=keys).scores
    bf16 = load_reward(manifest).score(images, prompts, keys=keys).scores
    assert bf16 == pytest.approx(fp32, abs=0.1)


def test_importing_the_package_does_not_import_transformers() -> None:
    code = "import sys, automerge.rewards; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.parametrize("name", REWARDS.names())
def test_plugin_declares_its_interface(name: str) -> None:
    plugin = REWARDS.get(name)
    assert isinstance(plugin.uses_prompts, bool)
    assert all(role.kind in ("file", "dir") for role in plugin.weight_roles)
    assert issubclass(plugin, RewardPlugin)


def test_register_reward_rejects_a_class_without_the_interface() -> None:
    from automerge.rewards.base import register_reward

    with pytest.raises(TypeError, match="lacks"):
        register_reward("broken")(type("Broken", (), {}))
    assert "broken" not in REWARDS
