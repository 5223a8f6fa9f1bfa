"""Weight files: missing, corrupt, sha256 mismatch, and fetching (never from the network in tests)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from automerge.checkpoints import sha256_file
from automerge.errors import RewardError
from automerge.rewards import fetch_reward_weights, load_reward
from automerge.testing.tiny_rewards import (
    write_tiny_clip_score,
    write_tiny_imagereward,
    write_tiny_laion_aesthetic,
)


def _edit_manifest(path: Path, **changes: object) -> Path:
    data = yaml.safe_load(path.read_text())
    data.update(changes)
    path.write_text(yaml.safe_dump(data))
    return path


def test_missing_weights_file_says_how_to_fetch_it(tmp_path: Path) -> None:
    manifest = write_tiny_imagereward(tmp_path)
    (tmp_path / "ImageReward.pt").unlink()
    expected = (
        f"{manifest}: weights.model: file {tmp_path / 'ImageReward.pt'} not found; run `automerge rewards fetch "
        "imagereward` online, or put ImageReward.pt (from the hub repo THUDM/ImageReward) there"
    )
    with pytest.raises(RewardError) as caught:
        load_reward(manifest)
    assert str(caught.value) == expected


def test_missing_weights_folder_without_hub_says_to_put_it_there(tmp_path: Path) -> None:
    manifest = write_tiny_clip_score(tmp_path)
    shutil.rmtree(tmp_path / "model")
    with pytest.raises(
        RewardError,
        match=r"weights.model: folder .*model not found; put a transformers CLIPModel folder \(config.json \+ model.safetensors\) there",
    ):
        load_reward(manifest)


def test_folder_lacking_a_hub_file_says_how_to_fetch_it(tmp_path: Path) -> None:
    manifest = write_tiny_clip_score(tmp_path)
    _edit_manifest(
        manifest,
        hub={
            "model": {"repo": "openai/clip-vit-large-patch14", "files": ["config.json", "model.safetensors"]}
        },
    )
    (tmp_path / "model" / "model.safetensors").unlink()
    with pytest.raises(
        RewardError,
        match=r"weights.model: folder .*model lacks model.safetensors; run `automerge rewards fetch clip-score` online",
    ):
        load_reward(manifest)


def test_file_where_a_folder_is_expected_raises(tmp_path: Path) -> None:
    manifest = write_tiny_clip_score(tmp_path)
    shutil.rmtree(tmp_path / "model")
    (tmp_path / "model").write_bytes(b"")
    with pytest.raises(RewardError, match="is a file, expected a folder"):
        load_reward(manifest)


def test_garbage_checkpoint_raises_reward_error_naming_the_file(tmp_path: Path) -> None:
    manifest = write_tiny_imagereward(tmp_path)
    (tmp_path / "ImageReward.pt").write_bytes(b"\x00garbage bytes, not a checkpoint" * 10)
    with pytest.raises(RewardError, match=r"ImageReward\.pt: cannot be read as a PyTorch state dict"):
        load_reward(manifest)


def test_checkpoint_that_is_not_a_state_dict_raises(tmp_path: Path) -> None:
    manifest = write_tiny_laion_aesthetic(tmp_path)
    torch.save(torch.zeros(3), tmp_path / "head.pth")
    with pytest.raises(RewardError, match="expected a state dict of tensors"):
        load_reward(manifest)


def test_garbage_safetensors_in_a_model_folder_raises_reward_error(tmp_path: Path) -> None:
    manifest = write_tiny_clip_score(tmp_path)
    (tmp_path / "model" / "model.safetensors").write_bytes(b"garbage" * 100)
    with pytest.raises(RewardError, match=r"model: cannot load a CLIPModel from this folder"):
        load_reward(manifest)


def test_sha256_mismatch_names_file_expected_and_found(tmp_path: Path) -> None:
    manifest = write_tiny_imagereward(tmp_path)
    found = sha256_file(tmp_path / "ImageReward.pt")
    _edit_manifest(manifest, sha256={"model": "0" * 64})
    with pytest.raises(RewardError) as caught:
        load_reward(manifest)
    message = str(caught.value)
    assert str(tmp_path / "ImageReward.pt") in message
    assert f"expected {'0' * 64}, found {found}" in message


def test_matching_sha256_loads(tmp_path: Path) -> None:
    manifest = write_tiny_imagereward(tmp_path)
    _edit_manifest(manifest, sha256={"model": sha256_file(tmp_path / "ImageReward.pt")})
    assert load_reward(manifest).name == "imagereward"


def test_sha256_of_a_file_inside_a_folder_role_is_checked(tmp_path: Path) -> None:
    manifest = write_tiny_clip_score(tmp_path)
    _edit_manifest(manifest, sha256={"model/model.safetensors": "f" * 64})
    with pytest.raises(
        RewardError, match=r"sha256 mismatch for .*model\.safetensors \(sha256\.model/model\.safetensors\)"
    ):
        load_reward(manifest)


def test_fetch_offline_says_which_file_to_put_where(tmp_path: Path) -> None:
    manifest = write_tiny_imagereward(tmp_path)
    (tmp_path / "ImageReward.pt").unlink()
    with pytest.raises(
        RewardError, match=rf"put ImageReward\.pt from THUDM/ImageReward at {tmp_path / 'ImageReward.pt'}"
    ):
        fetch_reward_weights(manifest)


def _fake_hub(source: Path) -> tuple[list[tuple[str, str]], object]:
    calls: list[tuple[str, str]] = []

    def download(*, repo_id: str, filename: str, revision: str | None, local_dir: str) -> str:
        calls.append((repo_id, filename))
        target = Path(local_dir) / filename
        shutil.copyfile(source / filename, target)
        return str(target)

    return calls, download


def test_fetch_places_missing_files_and_verifies_sha256(tmp_path: Path) -> None:
    manifest = write_tiny_imagereward(tmp_path / "hub")
    source = tmp_path / "hub"
    digest = sha256_file(source / "ImageReward.pt")
    local = tmp_path / "local"
    local.mkdir()
    shutil.copy(manifest, local / "imagereward.yaml")
    _edit_manifest(local / "imagereward.yaml", sha256={"model": digest})
    calls, download = _fake_hub(source)
    fetched = fetch_reward_weights(local / "imagereward.yaml", downloader=download)
    assert sorted(calls) == [
        ("THUDM/ImageReward", "ImageReward.pt"),
        ("THUDM/ImageReward", "med_config.json"),
        ("google-bert/bert-base-uncased", "vocab.txt"),
    ]
    assert sorted(p.name for p in fetched) == ["ImageReward.pt", "med_config.json", "vocab.txt"]
    assert sha256_file(local / "ImageReward.pt") == digest
    assert not [p for p in local.iterdir() if p.name.startswith(".fetch-")]  # no scratch left behind
    calls.clear()
    fetch_reward_weights(local / "imagereward.yaml", downloader=download)
    assert calls == []  # present and matching: nothing downloaded again


def test_fetch_tries_every_file_and_names_all_that_failed(tmp_path: Path) -> None:
    manifest = write_tiny_imagereward(tmp_path / "hub")
    local = tmp_path / "local"
    local.mkdir()
    shutil.copy(manifest, local / "imagereward.yaml")
    calls, copy_from_hub = _fake_hub(tmp_path / "hub")

    def offline_for_thudm(*, repo_id: str, filename: str, revision: str | None, local_dir: str) -> str:
        if repo_id == "THUDM/ImageReward":
            calls.append((repo_id, filename))
            raise OSError("offline")
        return copy_from_hub(repo_id=repo_id, filename=filename, revision=revision, local_dir=local_dir)

    with pytest.raises(RewardError) as caught:
        fetch_reward_weights(local / "imagereward.yaml", downloader=offline_for_thudm)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("2 of 3 files could not be fetched")
    assert f"put ImageReward.pt from THUDM/ImageReward at {local / 'ImageReward.pt'}" in message
    assert f"put med_config.json from THUDM/ImageReward at {local / 'med_config.json'}" in message
    assert (local / "vocab.txt").is_file()  # the one that could be fetched was fetched
    assert len(calls) == 3


def test_fetch_of_a_file_with_the_wrong_hash_raises(tmp_path: Path) -> None:
    manifest = write_tiny_imagereward(tmp_path / "hub")
    local = tmp_path / "local"
    local.mkdir()
    shutil.copy(manifest, local / "imagereward.yaml")
    _edit_manifest(local / "imagereward.yaml", sha256={"model": "1" * 64})
    _, download = _fake_hub(tmp_path / "hub")
    with pytest.raises(RewardError, match="sha256 mismatch"):
        fetch_reward_weights(local / "imagereward.yaml", downloader=download)


def test_fetch_without_hub_section_raises(tmp_path: Path) -> None:
    manifest = write_tiny_clip_score(tmp_path)
    with pytest.raises(RewardError, match="has no `hub` section"):
        fetch_reward_weights(manifest)


def test_fetch_into_a_folder_that_cannot_be_created_names_it(tmp_path: Path) -> None:
    manifest = write_tiny_imagereward(tmp_path / "hub")
    local = tmp_path / "local"
    local.mkdir()
    (local / "a-file").write_text("")
    shutil.copy(manifest, local / "imagereward.yaml")
    weights = {"model": "a-file/ImageReward.pt", "med_config": "med_config.json", "vocab": "vocab.txt"}
    _edit_manifest(local / "imagereward.yaml", weights=weights)
    _, download = _fake_hub(tmp_path / "hub")
    with pytest.raises(RewardError) as caught:
        fetch_reward_weights(local / "imagereward.yaml", downloader=download)
    assert f"cannot create folder {local / 'a-file'} for ImageReward.pt" in str(caught.value)
    assert (local / "vocab.txt").is_file()  # the others were still fetched


def test_an_unreachable_hub_is_tried_once_not_once_per_file(tmp_path: Path) -> None:
    """Offline, huggingface_hub retries each file for ~20 s: after the first connection failure the
    other files are not tried, and every missing file is still named with where to put it."""
    manifest = write_tiny_imagereward(tmp_path / "hub")
    local = tmp_path / "local"
    local.mkdir()
    shutil.copy(manifest, local / "imagereward.yaml")
    calls: list[str] = []

    def offline(*, repo_id: str, filename: str, revision: str | None, local_dir: str) -> str:
        calls.append(filename)
        raise ConnectionError("[Errno -2] Name or service not known")

    with pytest.raises(RewardError) as caught:
        fetch_reward_weights(local / "imagereward.yaml", downloader=offline)
    message = str(caught.value)
    assert len(calls) == 1
    assert message.startswith("3 of 3 files could not be fetched")
    for name, repo in [
        ("ImageReward.pt", "THUDM/ImageReward"),
        ("med_config.json", "THUDM/ImageReward"),
        ("vocab.txt", "google-bert/bert-base-uncased"),
    ]:
        assert f"put {name} from {repo} at {local / name}" in message
    assert message.count("not tried") == 2


def test_the_hubs_retry_log_lines_do_not_reach_the_user(tmp_path: Path, capfd) -> None:
    """Before: offline, `rewards fetch` printed huggingface_hub's "Retrying in 8s" and "thrown while
    requesting HEAD" warnings before its own one-line error."""
    import logging

    manifest = write_tiny_imagereward(tmp_path / "hub")
    local = tmp_path / "local"
    local.mkdir()
    shutil.copy(manifest, local / "imagereward.yaml")
    handler = logging.StreamHandler()  # where huggingface_hub's own handler writes: stderr
    hub_logger = logging.getLogger("huggingface_hub")
    hub_logger.addHandler(handler)

    def offline(*, repo_id: str, filename: str, revision: str | None, local_dir: str) -> str:
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 8s [Retry 5/5].")
        raise ConnectionError("[Errno -2] Name or service not known")

    try:
        with pytest.raises(RewardError):
            fetch_reward_weights(local / "imagereward.yaml", downloader=offline)
    finally:
        hub_logger.removeHandler(handler)
    assert "Retrying" not in capfd.readouterr().err


def _hub_and_local_copy(tmp_path: Path, *, sha256: dict[str, str]) -> Path:
    """A tiny ImageReward in ``hub/`` (what the fake hub serves) and its manifest alone in ``local/``
    with ``sha256`` as its pins; returns ``local/``."""
    hub = tmp_path / "hub"
    manifest = (
        hub / "imagereward.yaml" if (hub / "imagereward.yaml").exists() else write_tiny_imagereward(hub)
    )
    local = tmp_path / "local"
    local.mkdir()
    shutil.copy(manifest, local / "imagereward.yaml")
    _edit_manifest(local / "imagereward.yaml", sha256=sha256)
    return local


def test_fetch_pins_an_unpinned_file_on_first_download_and_loading_refuses_it_changed(tmp_path: Path) -> None:
    """Issue 14: ImageReward's sha256 cannot be known here (no network), so `rewards fetch` pins what
    it downloaded: `<file>.sha256` beside it in `sha256sum` format; every later load checks it, and a
    file that changed since is refused naming the pin and the fix."""
    import subprocess

    local = _hub_and_local_copy(tmp_path, sha256={})  # nothing pinned in the manifest
    _, download = _fake_hub(tmp_path / "hub")
    fetch_reward_weights(local / "imagereward.yaml", downloader=download)
    pin = local / "ImageReward.pt.sha256"
    digest = sha256_file(local / "ImageReward.pt")
    assert pin.read_text() == f"{digest}  ImageReward.pt\n"
    assert subprocess.run(["sha256sum", "--check", "--quiet", pin.name], cwd=local).returncode == 0
    assert {p.name for p in local.glob("*.sha256")} == {
        "ImageReward.pt.sha256",
        "med_config.json.sha256",
        "vocab.txt.sha256",
    }
    load_reward(local / "imagereward.yaml")  # pins match: loads
    state = torch.load(local / "ImageReward.pt", weights_only=True)
    next(iter(state.values())).add_(1.0)
    torch.save(state, local / "ImageReward.pt")  # replaced by another file after the fetch
    with pytest.raises(RewardError) as caught:
        load_reward(local / "imagereward.yaml")
    message = str(caught.value)
    assert message.startswith(
        f"sha256 mismatch for {local / 'ImageReward.pt'} (pinned at its first fetch in {pin})"
    )
    assert "automerge rewards fetch" in message and "\n" not in message


def test_a_manifest_pin_wins_and_no_pin_file_is_written_for_it(tmp_path: Path) -> None:
    write_tiny_imagereward(tmp_path / "hub")
    local = _hub_and_local_copy(tmp_path, sha256={"model": sha256_file(tmp_path / "hub" / "ImageReward.pt")})
    _, download = _fake_hub(tmp_path / "hub")
    fetch_reward_weights(local / "imagereward.yaml", downloader=download)
    assert not (local / "ImageReward.pt.sha256").exists()
    assert (local / "med_config.json.sha256").exists()


def test_a_present_unpinned_file_is_pinned_by_fetch_without_downloading(tmp_path: Path) -> None:
    local = _hub_and_local_copy(tmp_path, sha256={})
    for name in ("ImageReward.pt", "med_config.json", "vocab.txt"):
        shutil.copy(tmp_path / "hub" / name, local / name)  # copied by hand, as the message allows
    calls, download = _fake_hub(tmp_path / "hub")
    fetch_reward_weights(local / "imagereward.yaml", downloader=download)
    assert calls == [] and (local / "ImageReward.pt.sha256").exists()


def test_a_refetch_that_brings_another_file_than_the_pinned_one_is_refused(tmp_path: Path) -> None:
    local = _hub_and_local_copy(tmp_path, sha256={})
    _, download = _fake_hub(tmp_path / "hub")
    fetch_reward_weights(local / "imagereward.yaml", downloader=download)
    (tmp_path / "hub" / "med_config.json").write_text('{"changed": true}')  # the hub's file changed
    (local / "med_config.json").unlink()
    with pytest.raises(
        RewardError, match=r"sha256 mismatch for .*med_config.json \(pinned at its first fetch"
    ):
        fetch_reward_weights(local / "imagereward.yaml", downloader=download)
