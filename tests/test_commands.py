"""Helpers behind the CLI commands."""

from __future__ import annotations

from pathlib import Path

import pytest

from automerge.commands import resolve_reward_manifest
from automerge.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_a_bundled_reward_manifest_is_found_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_reward_manifest("imagereward") == ROOT / "rewards" / "imagereward.yaml"


def test_a_manifest_in_the_working_directory_comes_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / "imagereward.yaml").write_text("reward: imagereward\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_reward_manifest("imagereward") == Path("rewards") / "imagereward.yaml"


def test_an_unknown_manifest_name_lists_the_known_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ConfigError, match=r"no reward manifest 'imagerewad' \(did you mean 'imagereward'\?\).*pickscore"
    ):
        resolve_reward_manifest("imagerewad")
