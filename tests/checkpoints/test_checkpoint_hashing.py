"""sha256 of files, streamed, and A1111's AutoV2 short hash."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from automerge.checkpoints import a1111_short_hash, sha256_file
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
