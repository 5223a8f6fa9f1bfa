"""Every corrupt or unusable input gives one line naming the file and the problem, and writes nothing."""

from __future__ import annotations

import json
import pickle
import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from automerge.checkpoints import open_file_checkpoint
from automerge.errors import CheckpointError

_F32_PAIR = {
    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
}


def _safetensors(header: object, data: bytes, *, name: str = "model.safetensors") -> Callable[[Path], Path]:
    """A file maker writing ``header`` (JSON, or raw bytes) and ``data`` in safetensors layout."""

    def make(folder: Path) -> Path:
        body = header if isinstance(header, bytes) else json.dumps(header).encode()
        path = folder / name
        path.write_bytes(struct.pack("<Q", len(body)) + body + data)
        return path

    return make


def _torch_save_truncated(*, zip_format: bool) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / "model.ckpt"
        torch.save(
            {"state_dict": {"w": torch.arange(256.0)}}, path, _use_new_zipfile_serialization=zip_format
        )
        path.write_bytes(path.read_bytes()[:-40])
        return path

    return make


def _bytes(name: str, content: bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        (folder / name).write_bytes(content)
        return folder / name

    return make


def _torch_save(name: str, obj: object) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        torch.save(obj, folder / name)
        return folder / name

    return make


def _folder(folder: Path) -> Path:
    (folder / "unet").mkdir()
    return folder / "unet"


CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing path": (lambda folder: folder / "nope.safetensors", r"does not exist"),
    "directory": (_folder, r"is a directory"),
    "empty file": (_bytes("model.safetensors", b""), r"is empty \(0 bytes\)"),
    "shorter than length prefix": (_bytes("model.safetensors", b"\x10\x00"), r"shorter than the 8-byte"),
    "header length beyond file": (
        _bytes("model.safetensors", struct.pack("<Q", 4096) + b'{"a":1}'),
        r"header length 4096 bytes exceeds the 7 bytes that follow it \(truncated\)",
    ),
    "data section shorter than offsets": (
        _safetensors(_F32_PAIR, b"\0" * 10),
        r"data section is 10 bytes but tensor 'b' ends at byte 12 \(truncated\)",
    ),
    "offsets beyond data section": (
        _safetensors({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, b""),
        r"data section is 0 bytes but tensor 'a' ends at byte 4",
    ),
    "bytes after last tensor": (
        _safetensors(_F32_PAIR, b"\0" * 16),
        r"4 unexpected bytes after the last tensor",
    ),
    "overlapping offsets": (
        _safetensors(
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
        ),
        r"tensor 'b' at bytes \[4, 12\) overlaps tensor 'a'",
    ),
    "gap between tensors": (
        _safetensors(
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
            },
            b"\0" * 12,
        ),
        r"gap of 4 bytes before tensor 'b'",
    ),
    "size does not match shape": (
        _safetensors({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
        r"tensor 'a' spans 8 bytes but shape \[3\] of F32 needs 12",
    ),
    "end before begin": (
        _safetensors({"a": {"dtype": "U8", "shape": [0], "data_offsets": [4, 0]}}, b""),
        r"tensor 'a' has data_offsets \[4, 0\] with end before begin",
    ),
    "unknown dtype": (
        _safetensors({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
        r"tensor 'a' has unknown dtype 'F33'",
    ),
    "sub-byte dtype": (
        _safetensors({"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0"),
        r"tensor 'a' has sub-byte dtype F4, which automerge does not read; convert the file",
    ),
    "negative dimension": (
        _safetensors({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
        r"tensor 'a' has shape \[-1\], not a list of non-negative ints",
    ),
    "entry without offsets": (
        _safetensors({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4),
        r"tensor 'a' entry .* lacks one of \['dtype', 'shape', 'data_offsets'\]",
    ),
    "non-JSON header": (_safetensors(b"{not json}", b""), r"header is not valid JSON"),
    "header not an object": (_safetensors([1, 2], b""), r"header is a JSON list, not an object"),
    "duplicate tensor name": (
        _safetensors(
            b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
            b'"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
            b"\0",
        ),
        r"header names 'a' twice",
    ),
    "duplicate field of an entry": (
        _safetensors(b'{"a":{"dtype":"U8","dtype":"F32","shape":[1],"data_offsets":[0,1]}}', b"\0"),
        r"header names 'dtype' twice",
    ),
    "non-string metadata": (
        _safetensors({"__metadata__": {"ss_steps": 1000}}, b""),
        r"'__metadata__' value for 'ss_steps' is 1000, not a string",
    ),
    "unknown suffix and content": (
        _bytes("model.weights", b"GGUF\x03\x00\x00\x00" + b"\0" * 32),
        r"unknown suffix '\.weights' and content that is neither safetensors nor a PyTorch checkpoint",
    ),
    "ckpt that is not a torch file": (
        _bytes("model.ckpt", b"<html>404 Not Found</html>"),
        r"not a PyTorch checkpoint \(neither a torch\.save zip archive nor a torch\.save pickle\)",
    ),
    "truncated zip ckpt": (_torch_save_truncated(zip_format=True), r"cannot read PyTorch checkpoint"),
    "truncated legacy ckpt": (_torch_save_truncated(zip_format=False), r"cannot read PyTorch checkpoint"),
    "pickle holding a list": (_torch_save("model.pt", [torch.zeros(1)]), r"holds a list, not a state dict"),
    "pickle without tensors": (_torch_save("model.pt", {"global_step": 3}), r"holds no tensors"),
    "raw pickle with bad opcode": (
        _bytes("model.pt", pickle.dumps({"a": 1}, protocol=2)[:-1] + b"\xff"),
        r"refused to load: weights-only loading refused it \(Unsupported operand 255\)",
    ),
}


@pytest.mark.parametrize(("make", "problem"), list(CASES.values()), ids=list(CASES))
def test_corrupt_input_raises_one_line_naming_file_and_problem(
    tmp_path: Path, make: Callable[[Path], Path], problem: str
) -> None:
    path = make(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(CheckpointError) as caught:
        open_file_checkpoint(path)
    message = str(caught.value)
    assert str(path) in message
    assert "\n" not in message
    assert re.search(problem, message), message
    assert sorted(tmp_path.rglob("*")) == before
