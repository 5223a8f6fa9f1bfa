"""Pickled checkpoints are read only through ``torch.load(weights_only=True)``; hostile pickles never run."""

from __future__ import annotations

import os
import pickle
import struct
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from automerge.checkpoints import Checkpoint, TensorInfo, open_file_checkpoint, open_pickle_checkpoint
from automerge.errors import CheckpointError

_MKDIR_GLOBAL = f"{os.mkdir.__module__}.mkdir"  # posix.mkdir on Linux and macOS


class _MakesDirectory:
    """A pickle payload: unpickling it in full calls ``os.mkdir(marker)``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def _state() -> dict[str, torch.Tensor]:
    return {
        "model.diffusion_model.input_blocks.0.0.weight": torch.arange(24.0).reshape(2, 3, 2, 2),
        "model.diffusion_model.input_blocks.0.0.bias": torch.tensor([1.0, -1.0]).half(),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(5).reshape(1, 5),
    }


class _SpyLoad:
    """Wraps ``torch.load`` and records the keyword arguments of every call."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls: list[dict[str, Any]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        return self.real(*args, **kwargs)


@pytest.fixture
def spy_load(monkeypatch: pytest.MonkeyPatch) -> _SpyLoad:
    spy = _SpyLoad(torch.load)
    monkeypatch.setattr(torch, "load", spy)
    return spy


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_lightning_wrapper_is_unwrapped_and_non_tensors_ignored(tmp_path: Path, zip_format: bool) -> None:
    path = tmp_path / "model.ckpt"
    state = {**_state(), "model_ema.num_updates": 3, "nested": {"x": torch.zeros(1)}}
    torch.save(
        {"state_dict": state, "global_step": 470000, "epoch": 6},
        path,
        _use_new_zipfile_serialization=zip_format,
    )
    with open_pickle_checkpoint(path) as checkpoint:
        assert isinstance(checkpoint, Checkpoint)
        assert checkpoint.keys() == sorted(_state())
        assert dict(checkpoint.metadata) == {}
        for key, tensor in _state().items():
            assert checkpoint.info(key) == TensorInfo(shape=tuple(tensor.shape), dtype=tensor.dtype)
            loaded = checkpoint.load(key)
            assert loaded.device.type == "cpu" and torch.equal(loaded, tensor)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_plain_state_dicts_open_by_suffix(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    torch.save(_state(), path)
    with open_file_checkpoint(path) as checkpoint:
        assert checkpoint.keys() == sorted(_state())


def test_unknown_suffix_with_zip_content_is_read_as_pickle(tmp_path: Path) -> None:
    path = tmp_path / "model.weights"
    torch.save(_state(), path)
    with open_file_checkpoint(path) as checkpoint:
        assert checkpoint.keys() == sorted(_state())


@pytest.mark.parametrize(("zip_format", "mmap"), [(True, True), (False, False)], ids=["zip", "legacy"])
def test_torch_load_is_weights_only_and_mmaps_zip_files(
    tmp_path: Path, spy_load: _SpyLoad, zip_format: bool, mmap: bool
) -> None:
    path = tmp_path / "model.ckpt"
    torch.save(_state(), path, _use_new_zipfile_serialization=zip_format)
    open_pickle_checkpoint(path).close()
    assert spy_load.calls == [{"map_location": "cpu", "weights_only": True, "mmap": mmap}]


def test_payload_runs_when_fully_unpickled(tmp_path: Path) -> None:
    """Control for the tests below: the payload is live, so their checks can fail."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_MakesDirectory(marker)))
    assert marker.is_dir()


@pytest.mark.parametrize("layout", ["zip", "legacy", "raw-pickle"])
def test_hostile_pickle_is_refused_without_running(tmp_path: Path, spy_load: _SpyLoad, layout: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.ckpt"
    payload = {"state_dict": _state(), "callback": _MakesDirectory(marker)}
    if layout == "raw-pickle":  # a plain pickle (tensors pickled this way would be refused first)
        path.write_bytes(pickle.dumps({"callback": payload["callback"]}, protocol=2))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=layout == "zip")
    with pytest.raises(CheckpointError) as caught:
        open_file_checkpoint(path)
    message = str(caught.value)
    assert not marker.exists()
    assert str(path) in message and f"`{_MKDIR_GLOBAL}`" in message and "\n" not in message
    assert "safetensors" in message
    assert [call["weights_only"] for call in spy_load.calls] == [True]  # no second, unrestricted load


def test_lightning_callback_object_is_named_in_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An LDM-era .ckpt pickles Lightning objects; the package is faked only while saving."""
    name = "pytorch_lightning.callbacks.model_checkpoint"
    parts = name.split(".")
    for depth in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:depth]), types.ModuleType(".".join(parts[:depth])))
    callback_class = type("ModelCheckpoint", (), {"__module__": name})
    sys.modules[name].ModelCheckpoint = callback_class  # type: ignore[attr-defined]
    path = tmp_path / "sd-v1-4.ckpt"
    torch.save({"state_dict": _state(), "callbacks": {"ModelCheckpoint": callback_class()}}, path)
    for depth in range(1, len(parts) + 1):
        monkeypatch.delitem(sys.modules, ".".join(parts[:depth]))
    with pytest.raises(
        CheckpointError,
        match=r"sd-v1-4\.ckpt.*`pytorch_lightning\.callbacks\.model_checkpoint\.ModelCheckpoint`",
    ):
        open_pickle_checkpoint(path)


def test_parameters_load_as_plain_tensors(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"w": torch.nn.Parameter(torch.ones(2))}, path)
    with open_pickle_checkpoint(path) as checkpoint:
        loaded = checkpoint.load("w")
        assert type(loaded) is torch.Tensor and not loaded.requires_grad


def test_load_after_close_raises(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(_state(), path)
    checkpoint = open_pickle_checkpoint(path)
    checkpoint.close()
    with pytest.raises(ValueError, match=rf"^checkpoint {path} is closed$"):
        checkpoint.load(next(iter(_state())))


def test_an_unknown_key_names_the_file_the_key_and_the_nearest_key(tmp_path: Path) -> None:
    from automerge.errors import CheckpointError

    path = tmp_path / "model.pt"
    torch.save(_state(), path)
    with open_pickle_checkpoint(path) as checkpoint:
        with pytest.raises(CheckpointError) as caught:
            checkpoint.load("model.diffusion_model.input_blocks.0.0.weigth")
    message = str(caught.value)
    assert message.startswith(f"{path}: no tensor named 'model.diffusion_model.input_blocks.0.0.weigth'")
    assert "model.diffusion_model.input_blocks.0.0.weight" in message.split("weigth'", 1)[1]


def test_the_refusal_names_the_global_or_the_most_specific_line_of_torchs_message() -> None:
    from automerge.checkpoints._pickle_reader import _first_sentence, _refusal_reason

    needs_global = "Weights only load failed. ...\nWeightsUnpickler error: Unsupported global: GLOBAL os.system was not an allowed global"
    assert _refusal_reason(needs_global) == (
        "it needs the Python global `os.system`, which weights-only loading does not run"
    )
    specific = (
        "Weights only load failed. This file can still be loaded.\n"
        "(1) In PyTorch 2.6, we changed the default\n"
        "WeightsUnpickler error: Unsupported operand 149: a: b"
    )
    assert _refusal_reason(specific) == "weights-only loading refused it (Unsupported operand 149: a: b)"
    assert _refusal_reason("Weights only load failed.\nCheck the documentation of torch.load") == (
        "weights-only loading refused it"
    )
    assert _first_sentence(RuntimeError("PytorchStreamReader failed. Trailing  text. More")) == (
        "PytorchStreamReader failed"
    )
    assert _first_sentence(RuntimeError("  ")) == "RuntimeError"


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"PK\x03\x04rest", "zip"),  # torch.save's zip format
        (b"\x80\x02", "legacy"),  # exactly two bytes: protocol 2, the oldest torch.save writes
        (b"\x80\x05}q\x00", "legacy"),  # protocol 5, the newest
        (b"\x80\x01", None),  # protocol 1 is not a torch.save stream
        (b"\x80\x06", None),  # no protocol 6 exists
        (b"\x80", None),  # cut after the opcode
        (b"", None),
        (b"PK\x03", None),  # a cut zip magic
        (b"\x02\x80", None),
    ],
)
def test_the_format_of_a_torch_file_is_told_by_its_first_bytes(head: bytes, kind: str | None) -> None:
    from automerge.checkpoints._pickle_reader import pickle_kind

    assert pickle_kind(head) == kind


@pytest.mark.parametrize(
    ("head", "looks"),
    [
        (struct.pack("<Q", 1) + b"{", True),  # the smallest header length, read as exactly 9 bytes
        (struct.pack("<Q", 120) + b'{"a": 1}', True),  # more bytes than the 9 it needs
        (struct.pack("<Q", 0) + b"{", False),  # a zero-length header is no header
        (struct.pack("<Q", 2**63 + 5) + b"{", True),  # unsigned: a huge length is still this format
        (struct.pack("<Q", 120) + b"[", False),
        (struct.pack("<Q", 120), False),  # cut before the JSON
    ],
)
def test_a_safetensors_file_is_told_by_its_length_prefix_and_brace(head: bytes, looks: bool) -> None:
    """(The reader then refuses a huge length with its own message; detection only names the format.)"""
    from automerge.checkpoints._open import _looks_like_safetensors

    assert _looks_like_safetensors(head) is looks


def test_a_pickle_without_tensors_names_its_first_five_keys_and_the_checkpoint_keeps_its_path(
    tmp_path: Path,
) -> None:
    empty = tmp_path / "steps.pt"
    torch.save({f"k{i}": i for i in range(7)}, empty)
    with pytest.raises(CheckpointError) as caught:
        open_pickle_checkpoint(empty)
    assert str(caught.value) == f"{empty}: holds no tensors (keys: ['k0', 'k1', 'k2', 'k3', 'k4'])"
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, path)
    assert open_pickle_checkpoint(path).path == path
