"""Tiny reward models written once per session (read-only: tests that alter files write their own)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from automerge.testing.tiny_rewards import TINY_REWARDS, tiny_image

KEYS = ("item0-s1", "item1-s2")  # the keys write_reference writes references for
PROMPTS = ("a photo of a cat", "a red house in the tree")


@pytest.fixture()
def keys() -> tuple[str, ...]:
    return KEYS


@pytest.fixture()
def prompts() -> tuple[str, ...]:
    return PROMPTS


@pytest.fixture(scope="session")
def tiny_manifests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-rewards")
    return {name: write(root / name) for name, write in TINY_REWARDS.items()}


@pytest.fixture()
def images() -> list[Image.Image]:
    """Two 64×64 random images, the first equal to the reference written for KEYS[0]."""
    return [tiny_image(0), tiny_image(7)]
