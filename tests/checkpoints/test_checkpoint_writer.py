"""The streaming, atomic safetensors writer: reference-compatible output, or no output at all."""

from __future__ import annotations

import errno
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from automerge.checkpoints import SafetensorsWriter, TensorInfo, open_safetensors, save_safetensors
from automerge.checkpoints import _writer as writer_module
from automerge.errors import CheckpointError, ConfigError


def _mixed() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 4, generator=generator),
        "f16": torch.randn(5, generator=generator).half(),
        "bf16": torch.randn(2, 3, generator=generator).to(torch.bfloat16),
        "i64": torch.tensor([-(2**40), 0, 7]),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 4),
        "f8": torch.tensor([1.0, -0.5]).to(torch.float8_e4m3fn),
        "transposed": torch.arange(6.0).reshape(2, 3).t(),
    }


def _infos(tensors: dict[str, torch.Tensor]) -> dict[str, TensorInfo]:
    return {key: TensorInfo(shape=tuple(t.shape), dtype=t.dtype) for key, t in tensors.items()}


def _header(path: Path) -> tuple[int, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw[8 : 8 + n]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_round_trip_through_the_reference_readers(tmp_path: Path) -> None:
    path = tmp_path / "merged.safetensors"
    tensors = _mixed()
    save_safetensors(path, tensors, metadata={"modelspec.title": "mix"})
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    assert all(_same(loaded[key].reshape(-1), tensors[key].reshape(-1)) for key in tensors)
    assert all(loaded[key].shape == tensors[key].shape for key in tensors)
    with safe_open(path, framework="pt") as handle:
        assert handle.metadata() == {"modelspec.title": "mix"}
        assert torch.equal(handle.get_tensor("transposed"), tensors["transposed"])
    with open_safetensors(path) as checkpoint:
        assert {key: checkpoint.info(key) for key in tensors} == _infos(tensors)


def test_output_is_byte_identical_to_the_reference_writer(tmp_path: Path) -> None:
    # the reference orders tensors by dtype, then name; all-F32 names in sorted order match it
    tensors = {"a.bias": torch.ones(3), "a.weight": torch.arange(10.0).reshape(2, 5), "b": torch.tensor(2.0)}
    ours, reference = tmp_path / "ours.safetensors", tmp_path / "reference.safetensors"
    save_safetensors(ours, tensors, metadata={"sd_merge_recipe": '{"alpha": 0.5}'})
    save_file(tensors, reference, metadata={"sd_merge_recipe": '{"alpha": 0.5}'})
    assert ours.read_bytes() == reference.read_bytes()


def test_file_order_is_the_infos_order_and_header_is_space_padded(tmp_path: Path) -> None:
    path = tmp_path / "merged.safetensors"
    tensors = {"z": torch.ones(1), "a": torch.ones(3, dtype=torch.bool), "m": torch.zeros(2).half()}
    save_safetensors(path, tensors, metadata={})
    n, body = _header(path)
    assert n % 8 == 0 and body == body.rstrip() + b" " * (n - len(body.rstrip()))
    document = json.loads(body)
    assert "__metadata__" not in document
    assert [document[key]["data_offsets"] for key in ("z", "a", "m")] == [[0, 4], [4, 7], [7, 11]]


def test_temp_file_sits_beside_the_destination_until_the_end(tmp_path: Path) -> None:
    path = tmp_path / "merged.safetensors"
    tensors = {"a": torch.ones(2), "b": torch.zeros(3)}
    with SafetensorsWriter(path, _infos(tensors), metadata={}) as writer:
        writer.write("a", tensors["a"])
        temps = list(tmp_path.glob(".merged.safetensors.tmp-*"))
        assert len(temps) == 1 and not path.exists()
        writer.write("b", tensors["b"])
    assert [p.name for p in tmp_path.iterdir()] == ["merged.safetensors"]


def test_exception_inside_the_block_leaves_no_output_and_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "merged.safetensors"
    path.write_bytes(b"previous export")
    tensors = {"a": torch.ones(2), "b": torch.zeros(3)}
    with pytest.raises(RuntimeError, match="merge failed"):
        with SafetensorsWriter(path, _infos(tensors), metadata={}) as writer:
            writer.write("a", tensors["a"])
            raise RuntimeError("merge failed")
    assert [p.name for p in tmp_path.iterdir()] == ["merged.safetensors"]
    assert path.read_bytes() == b"previous export"


def test_missing_keys_leave_no_output(tmp_path: Path) -> None:
    path = tmp_path / "merged.safetensors"
    tensors = {"a": torch.ones(2), "b": torch.zeros(3), "c": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"2 of 3 tensors never written \(first: 'b'\)"):
        with SafetensorsWriter(path, _infos(tensors), metadata={}) as writer:
            writer.write("a", tensors["a"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("key", "tensor", "problem"),
    [
        ("b", torch.zeros(3), r"expected tensor 'a' next, got 'b'"),
        (
            "a",
            torch.ones(3),
            r"tensor 'a' is TensorInfo\(shape=\(3,\).*announced as TensorInfo\(shape=\(2,\)",
        ),
        ("a", torch.ones(2, dtype=torch.float16), r"tensor 'a' is .*float16.*announced as .*float32"),
    ],
    ids=["wrong order", "wrong shape", "wrong dtype"],
)
def test_mismatched_writes_raise_and_leave_no_output(
    tmp_path: Path, key: str, tensor: torch.Tensor, problem: str
) -> None:
    path = tmp_path / "merged.safetensors"
    tensors = {"a": torch.ones(2), "b": torch.zeros(3)}
    with pytest.raises(ValueError, match=problem):
        with SafetensorsWriter(path, _infos(tensors), metadata={}) as writer:
            writer.write(key, tensor)
    assert list(tmp_path.iterdir()) == []


def test_non_string_metadata_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'ss_steps': 1000 \(int\)"):
        save_safetensors(tmp_path / "m.safetensors", {"a": torch.ones(1)}, metadata={"ss_steps": 1000})  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


def test_missing_destination_folder_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"folder .*nope does not exist"):
        save_safetensors(tmp_path / "nope" / "m.safetensors", {"a": torch.ones(1)}, metadata={})


def test_write_outside_the_block_raises(tmp_path: Path) -> None:
    writer = SafetensorsWriter(
        tmp_path / "m.safetensors", {"a": TensorInfo((1,), torch.float32)}, metadata={}
    )
    with pytest.raises(ValueError, match="not open"):
        writer.write("a", torch.ones(1))
    assert list(tmp_path.iterdir()) == []


def test_metadata_key_is_not_a_tensor_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'__metadata__' cannot be a tensor name"):
        SafetensorsWriter(tmp_path / "m.safetensors", {"__metadata__": TensorInfo((1,), torch.float32)})


def test_writer_cannot_be_entered_twice(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    writer = SafetensorsWriter(path, {"a": TensorInfo((1,), torch.float32)}, metadata={})
    with writer:
        writer.write("a", torch.ones(1))
    with pytest.raises(ValueError, match="entered only once"):
        with writer:
            pass
    assert torch.equal(load_file(path)["a"], torch.ones(1))


def test_failed_disk_write_raises_checkpoint_error_and_leaves_no_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.safetensors"
    tensors = {"a": torch.ones(2), "b": torch.zeros(3)}

    def disk_full(tensor: torch.Tensor) -> memoryview:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointError, match=r"cannot write .*m\.safetensors: No space left on device"):
        with SafetensorsWriter(path, _infos(tensors), metadata={}) as writer:
            writer.write("a", tensors["a"])
            monkeypatch.setattr(writer_module, "_little_endian_bytes", disk_full)
            writer.write("b", tensors["b"])
    assert list(tmp_path.iterdir()) == []


def test_metadata_updated_before_commit_replaces_the_header_in_place(tmp_path: Path) -> None:
    path = tmp_path / "late.safetensors"
    tensors = _mixed()
    with SafetensorsWriter(path, _infos(tensors), metadata={"sha256": "0" * 64, "x": "y"}) as writer:
        for key, tensor in tensors.items():
            writer.write(key, tensor)
        writer.update_metadata({"sha256": "ab" * 32})
    with safe_open(path, framework="pt") as handle:
        assert handle.metadata() == {"sha256": "ab" * 32}
    loaded = load_file(path)
    assert all(_same(loaded[key].reshape(-1), tensors[key].reshape(-1)) for key in tensors)
    size, header = _header(path)
    assert (8 + size) % 8 == 0 and header.endswith(b" ")


def test_metadata_update_longer_than_the_reserved_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "late.safetensors"
    with SafetensorsWriter(path, {"t": TensorInfo((2,), torch.float32)}, metadata={"h": ""}) as writer:
        writer.write("t", torch.ones(2))
        with pytest.raises(ValueError, match="more than the .* reserved"):
            writer.update_metadata({"h": "x" * 100})
    with safe_open(path, framework="pt") as handle:  # the first header is still intact
        assert handle.metadata() == {"h": ""}


def test_a_failing_file_write_is_reported_and_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"previous export")
    tensors = {f"t{i}": torch.full((1000,), float(i)) for i in range(4)}
    calls: list[int] = []

    def fails_on_the_second_call(file: object, data: memoryview) -> None:
        calls.append(data.nbytes)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_module, "_write_all", fails_on_the_second_call)
    with pytest.raises(CheckpointError, match=r"cannot write .*m\.safetensors: No space left on device"):
        with SafetensorsWriter(path, _infos(tensors), metadata={}) as writer:
            for key, tensor in tensors.items():
                writer.write(key, tensor)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    assert path.read_bytes() == b"previous export"


def test_writeback_is_started_over_consecutive_runs_of_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ranges: list[tuple[int, int]] = []
    monkeypatch.setattr(writer_module, "WRITEBACK_BYTES", 10_000)
    monkeypatch.setattr(
        writer_module, "_start_writeback", lambda file, start, end: ranges.append((start, end))
    )
    tensors = {f"t{i}": torch.randn(1500 + i, generator=torch.Generator().manual_seed(i)) for i in range(20)}
    path = tmp_path / "big.safetensors"
    save_safetensors(path, tensors)
    header_end = 8 + _header(path)[0]
    assert ranges[0][0] == header_end
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert all(end - start >= 10_000 for start, end in ranges)
    assert path.stat().st_size - ranges[-1][1] < 10_000
    loaded = load_file(path)
    assert all(torch.equal(loaded[key], tensor) for key, tensor in tensors.items())


def test_real_writeback_hints_leave_the_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_module, "WRITEBACK_BYTES", 4096)
    tensors = {f"t{i}": torch.randn(3000, generator=torch.Generator().manual_seed(i)) for i in range(8)}
    path = tmp_path / "hinted.safetensors"
    save_safetensors(path, tensors, metadata={"k": "v"})
    loaded = load_file(path)
    assert all(torch.equal(loaded[key], tensor) for key, tensor in tensors.items())


@pytest.mark.skipif(not hasattr(__import__("os"), "posix_fadvise"), reason="Linux page-cache advice")
def test_writeback_is_started_for_each_run_of_bytes_as_written(tmp_path: Path, monkeypatch) -> None:
    """Every WRITEBACK_BYTES written, the kernel is asked to write that run back (so a multi-GB export
    does not pile up dirty pages): one call per run, covering the data written since the last one."""
    import os

    calls: list[tuple[int, int, int]] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append((offset, length, advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(writer_module, "WRITEBACK_BYTES", 4096)
    monkeypatch.setattr(os, "posix_fadvise", spy)
    tensors = {f"t{i}": torch.full((1024,), float(i)) for i in range(3)}  # 4096 bytes each
    infos = {key: TensorInfo((1024,), torch.float32) for key in tensors}
    with SafetensorsWriter(tmp_path / "w.safetensors", infos) as writer:
        start = writer._position
        for key, tensor in tensors.items():
            writer.write(key, tensor)
    advice = os.POSIX_FADV_DONTNEED
    assert calls == [(start, 4096, advice), (start + 4096, 4096, advice), (start + 8192, 4096, advice)]
    assert load_file(tmp_path / "w.safetensors")["t2"][0] == 2.0


@pytest.mark.parametrize(
    ("shape", "dtype", "message"),
    [
        ((2, -1), torch.float32, "TensorInfo shape must be non-negative ints, got (2, -1)"),
        ((True,), torch.float32, "TensorInfo shape must be non-negative ints, got (True,)"),
        ((2,), "float32", "TensorInfo dtype must be a torch.dtype, got 'float32'"),
    ],
    ids=["negative", "bool", "dtype-name"],
)
def test_a_tensor_info_refuses_a_bad_shape_or_dtype_saying_which(shape, dtype, message) -> None:
    """What a writer is announced is checked where it is made, and the message shows the bad value."""
    with pytest.raises(ValueError) as refused:
        TensorInfo(shape, dtype)
    assert str(refused.value) == message


def test_writes_in_another_order_give_the_same_file_and_a_key_out_of_that_order_is_refused(
    tmp_path: Path,
) -> None:
    """``order``: the tensors are written in it, each at its place in the layout of ``infos``, so
    the file is byte for byte the one written in the layout's order; a key out of that order, or an
    order that does not name each tensor once, is refused."""
    tensors = _mixed()
    in_order = tmp_path / "in-order.safetensors"
    save_safetensors(in_order, tensors)
    reordered = tmp_path / "reordered.safetensors"
    order = [*list(tensors)[3:][::-1], *list(tensors)[:3]]
    with SafetensorsWriter(reordered, _infos(tensors), order=order) as writer:
        for key in order:
            writer.write(key, tensors[key])
    assert reordered.read_bytes() == in_order.read_bytes()
    with pytest.raises(ValueError, match="expected tensor 'i64' next, got 'f32'"):
        with SafetensorsWriter(
            tmp_path / "x.safetensors", _infos(tensors), order=["i64", *(k for k in order if k != "i64")]
        ) as writer:
            writer.write("f32", tensors["f32"])
    for bad in (order[:-1], [*order, "f32"], [*order[:-1], "nowhere"]):
        with pytest.raises(ValueError, match="name each tensor once"):
            SafetensorsWriter(tmp_path / "y.safetensors", _infos(tensors), order=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in-order.safetensors", "reordered.safetensors"]
