"""The resumable writer: the bytes of ``SafetensorsWriter``, a journal of what is written, and what a
failure leaves for the next run."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from automerge.checkpoints import ResumableSafetensorsWriter, SafetensorsWriter, TensorInfo, partial_paths
from automerge.checkpoints import _writer as writer_module
from automerge.errors import CheckpointError

FINGERPRINT = {"the recipe": "weighted_sum 0.5"}


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "t0": torch.randn(100, generator=generator),
        "empty": torch.zeros(0, 3),
        "t1": torch.randn(7, 3, generator=generator).half(),
        "i": torch.arange(5),
    }


def _infos(tensors: dict[str, torch.Tensor]) -> dict[str, TensorInfo]:
    return {key: TensorInfo(tuple(t.shape), t.dtype) for key, t in tensors.items()}


def _write(path: Path, tensors: dict[str, torch.Tensor], **fingerprint: str) -> ResumableSafetensorsWriter:
    writer = ResumableSafetensorsWriter(
        path, _infos(tensors), metadata={"m": "v"}, fingerprint={**FINGERPRINT, **fingerprint}
    )
    with writer:
        for key, tensor in tensors.items():
            if key not in writer.done:
                writer.write(key, tensor)
    return writer


def test_the_file_is_byte_identical_to_the_plain_writers_and_nothing_else_is_left(tmp_path: Path) -> None:
    tensors = _tensors()
    _write(tmp_path / "r.safetensors", tensors)
    with SafetensorsWriter(tmp_path / "p.safetensors", _infos(tensors), metadata={"m": "v"}) as plain:
        for key, tensor in tensors.items():
            plain.write(key, tensor)
    assert (tmp_path / "r.safetensors").read_bytes() == (tmp_path / "p.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors", "r.safetensors"]


def test_the_journal_names_its_fingerprint_then_each_written_tensor(tmp_path: Path) -> None:
    tensors = _tensors()
    path = tmp_path / "r.safetensors"
    with pytest.raises(KeyboardInterrupt):
        with ResumableSafetensorsWriter(path, _infos(tensors), fingerprint=FINGERPRINT) as writer:
            writer.write("t0", tensors["t0"])
            writer.write("empty", tensors["empty"])
            raise KeyboardInterrupt
    partial, journal = partial_paths(path)
    head, *records = [json.loads(line) for line in journal.read_text().splitlines()]
    assert head["format"] == 1 and set(head["fingerprint"]) == {"the recipe", "the header"}
    assert [r["key"] for r in records] == ["t0", "empty"]
    begin, end = records[0]["begin"], records[0]["end"]
    assert end - begin == 400 and partial.read_bytes()[begin:end] == tensors["t0"].numpy().tobytes()
    assert records[1]["begin"] == records[1]["end"] == end


def test_a_failed_disk_write_keeps_the_partial_file_and_says_so_and_the_next_run_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors = _tensors()
    path = tmp_path / "r.safetensors"
    real = writer_module._write_all
    calls: list[int] = []

    def full_on_the_third(file: object, data: memoryview) -> None:
        calls.append(data.nbytes)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(file, data)  # type: ignore[arg-type]

    monkeypatch.setattr(writer_module, "_write_all", full_on_the_third)
    with pytest.raises(
        CheckpointError,
        match=r"No space left on device; the 2 tensors written so far stay in \.r\.safetensors\.partial",
    ):
        _write(path, tensors)
    assert not path.exists() and all(p.exists() for p in partial_paths(path))
    monkeypatch.setattr(writer_module, "_write_all", real)
    writer = _write(path, tensors)
    assert writer.done == {"t0", "empty"}
    loaded = load_file(path)
    assert all(torch.equal(loaded[key], tensor) for key, tensor in tensors.items())


def test_any_other_exception_deletes_the_partial_file_and_journal(tmp_path: Path) -> None:
    tensors = _tensors()
    path = tmp_path / "r.safetensors"
    with pytest.raises(ValueError, match="announced as"):
        with ResumableSafetensorsWriter(path, _infos(tensors), fingerprint=FINGERPRINT) as writer:
            writer.write("t0", tensors["t0"])
            writer.write("empty", torch.zeros(3))
    assert list(tmp_path.iterdir()) == []


def test_other_metadata_is_another_fingerprint(tmp_path: Path) -> None:
    """The header is part of the fingerprint: a title or extra field of another run starts over."""
    tensors = _tensors()
    path = tmp_path / "r.safetensors"
    with pytest.raises(KeyboardInterrupt):
        with ResumableSafetensorsWriter(path, _infos(tensors), fingerprint=FINGERPRINT) as writer:
            writer.write("t0", tensors["t0"])
            raise KeyboardInterrupt
    infos = _infos(tensors)
    with ResumableSafetensorsWriter(path, infos, metadata={"title": "x"}, fingerprint=FINGERPRINT) as writer:
        assert writer.done == frozenset() and writer.discarded == "the header changed since it was started"
        for key, tensor in tensors.items():
            writer.write(key, tensor)
    assert load_file(path).keys() == tensors.keys()
