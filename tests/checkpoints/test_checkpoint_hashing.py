"""sha256 of files, streamed, and A1111's AutoV2 short hash."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from automerge.checkpoints import _hashing, a1111_short_hash, cached_sha256, sha256_file, warm_hash_cache
from automerge.errors import CheckpointError

_ABC_SHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2 example


def test_sha256_matches_the_published_test_vector(tmp_path: Path) -> None:
    path = tmp_path / "abc.bin"
    path.write_bytes(b"abc")
    assert sha256_file(path) == _ABC_SHA256


@pytest.mark.parametrize(
    "size", [0, (1 << 20) - 1, 1 << 20, (5 << 19) + 3], ids=["empty", "<1MiB", "1MiB", "2.5MiB"]
)
def test_sha256_across_chunk_boundaries_matches_hashlib(tmp_path: Path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_sha256_of_a_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"cannot hash .*missing\.safetensors"):
        sha256_file(tmp_path / "missing.safetensors")


def test_a1111_short_hash_is_the_first_ten_hex_digits() -> None:
    assert a1111_short_hash(_ABC_SHA256) == "ba7816bf8f"
    assert a1111_short_hash(_ABC_SHA256.upper()) == "ba7816bf8f"


@pytest.mark.parametrize("bad", ["ba7816bf8f", "z" * 64, _ABC_SHA256 + "0"])
def test_a1111_short_hash_rejects_non_sha256_input(bad: str) -> None:
    with pytest.raises(ValueError, match="64-digit hex sha256"):
        a1111_short_hash(bad)


def test_cached_sha256_hashes_a_file_once_until_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"first version")
    assert cached_sha256(path) == sha256_file(path)
    calls: list[Path] = []
    real = _hashing.sha256_file
    monkeypatch.setattr(_hashing, "sha256_file", lambda p: calls.append(p) or real(p))
    assert cached_sha256(path) == hashlib.sha256(b"first version").hexdigest()
    assert calls == []  # served from the cache
    path.write_bytes(b"second version, longer")
    assert cached_sha256(path) == hashlib.sha256(b"second version, longer").hexdigest()
    assert calls == [path.resolve()]


def test_a_corrupt_or_unwritable_cache_never_fails_a_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights")
    expected = hashlib.sha256(b"weights").hexdigest()
    _hashing.hash_cache_path().parent.mkdir(parents=True, exist_ok=True)
    _hashing.hash_cache_path().write_text("{not json", encoding="utf-8")
    assert cached_sha256(path) == expected
    assert expected in _hashing.hash_cache_path().read_text(encoding="utf-8")  # rewritten whole
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(_hashing.CACHE_DIR_VARIABLE, str(blocker / "cache"))  # cannot be created
    assert cached_sha256(path) == expected


def test_warm_hash_cache_fills_the_cache_in_the_background(tmp_path: Path) -> None:
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for i, path in enumerate(paths):
        path.write_bytes(bytes([i]) * 1000)
    warm_hash_cache([*paths, tmp_path / "missing.safetensors"]).join(timeout=60)
    cached = _hashing._read_cache()
    assert {str(p.resolve()) for p in paths} <= set(cached)
    assert cached[str(paths[1].resolve())]["sha256"] == hashlib.sha256(bytes([1]) * 1000).hexdigest()


def test_the_hash_cache_lives_in_automerges_cache_folder_by_variable_xdg_or_home(
    monkeypatch, tmp_path
) -> None:
    monkeypatch.setenv("AUTOMERGE_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _hashing.hash_cache_path() == tmp_path / "mine" / "sha256.json"
    monkeypatch.delenv("AUTOMERGE_CACHE_DIR")
    assert _hashing.hash_cache_path() == tmp_path / "xdg" / "automerge" / "sha256.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _hashing.hash_cache_path() == tmp_path / "home" / ".cache" / "automerge" / "sha256.json"
