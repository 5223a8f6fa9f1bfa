"""Lazy safetensors reading: keys and infos come from the validated header alone, tensors on demand."""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from automerge.checkpoints import (
    Checkpoint,
    TensorInfo,
    open_file_checkpoint,
    open_safetensors,
    save_safetensors,
)
from automerge.checkpoints import _safetensors_reader as reader_module
from automerge.errors import CheckpointError


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "model.diffusion_model.out.2.weight": torch.randn(4, 3, generator=generator),
        "first_stage_model.decoder.conv_in.bias": torch.randn(5, generator=generator).half(),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(7).reshape(1, 7),
        "alphas_cumprod": torch.randn(3, generator=generator).to(torch.bfloat16),
    }


def _header_length(path: Path) -> int:
    length: int = struct.unpack("<Q", path.read_bytes()[:8])[0]
    return length


class _SpyMmap:
    """Counts the memory maps the reader module makes."""

    ACCESS_COPY = mmap.ACCESS_COPY

    def __init__(self) -> None:
        self.opened = 0

    def mmap(self, *args: Any, **kwargs: Any) -> mmap.mmap:
        self.opened += 1
        return mmap.mmap(*args, **kwargs)


def test_keys_are_sorted_and_infos_match_the_tensors(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    tensors = _tensors()
    save_file(tensors, path, metadata={"modelspec.title": "a"})
    with open_safetensors(path) as checkpoint:
        assert isinstance(checkpoint, Checkpoint)
        assert checkpoint.keys() == sorted(tensors)
        for key, tensor in tensors.items():
            assert checkpoint.info(key) == TensorInfo(shape=tuple(tensor.shape), dtype=tensor.dtype)
        assert dict(checkpoint.metadata) == {"modelspec.title": "a"}


def test_load_returns_the_stored_tensor_on_cpu_in_its_dtype(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    tensors = _tensors()
    save_file(tensors, path)
    with open_safetensors(path) as checkpoint:
        for key, tensor in tensors.items():
            loaded = checkpoint.load(key)
            assert loaded.device.type == "cpu" and loaded.dtype == tensor.dtype
            assert torch.equal(loaded, tensor)


def test_keys_and_info_read_only_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"big": torch.zeros(4096), "small": torch.ones(2)}, path)
    spy = _SpyMmap()
    monkeypatch.setattr(reader_module, "mmap", spy)
    bytes_read: list[int] = []
    real_open = Path.open

    def counting_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        handle = real_open(self, *args, **kwargs)
        real_read = handle.read

        def read(size: int = -1) -> bytes:
            data: bytes = real_read(size)
            bytes_read.append(len(data))
            return data

        handle.read = read
        return handle

    monkeypatch.setattr(Path, "open", counting_open)
    with open_safetensors(path) as checkpoint:
        assert checkpoint.info("big").nbytes == 4096 * 4
        assert checkpoint.keys() == ["big", "small"]
        assert spy.opened == 0
        assert 0 < sum(bytes_read) == 8 + _header_length(path) < path.stat().st_size
        assert torch.equal(checkpoint.load("small"), torch.ones(2))
        assert torch.equal(checkpoint.load("big"), torch.zeros(4096))
        assert spy.opened == 1  # one map for every tensor


def test_a_loaded_tensor_outlives_close_and_an_unaligned_one_is_read(tmp_path: Path) -> None:
    """Views keep the map alive after ``close``; a tensor whose offset is not a multiple of its
    element size (the format allows it) is copied out instead of viewed."""
    path = tmp_path / "model.safetensors"
    tensors = {"a": torch.arange(3, dtype=torch.uint8), "b": torch.arange(4, dtype=torch.float32)}
    save_safetensors(path, tensors)  # in this order: b starts at byte 3 of the data
    header = json.loads(path.read_bytes()[8 : 8 + _header_length(path)])
    assert header["b"]["data_offsets"][0] == 3
    with open_safetensors(path) as checkpoint:
        kept = checkpoint.load("a")
        assert torch.equal(checkpoint.load("b"), torch.arange(4, dtype=torch.float32))
    assert torch.equal(kept, torch.arange(3, dtype=torch.uint8))


def test_info_works_when_the_data_section_is_garbage(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(8, 2, dtype=torch.float16)}, path)
    start = 8 + _header_length(path)
    raw = bytearray(path.read_bytes())
    raw[start:] = b"\xff" * (len(raw) - start)  # every fp16 element becomes NaN
    path.write_bytes(bytes(raw))
    with open_safetensors(path) as checkpoint:
        assert checkpoint.info("w") == TensorInfo(shape=(8, 2), dtype=torch.float16)
        assert checkpoint.load("w").isnan().all()


def test_zero_dim_and_empty_tensors_have_exact_infos(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3, dtype=torch.int64)}, path)
    with open_safetensors(path) as checkpoint:
        assert checkpoint.info("scalar") == TensorInfo(shape=(), dtype=torch.float32)
        assert (checkpoint.info("scalar").numel, checkpoint.info("scalar").nbytes) == (1, 4)
        assert (checkpoint.info("empty").numel, checkpoint.info("empty").nbytes) == (0, 0)
        assert checkpoint.load("scalar").item() == 2.5


def test_float8_tensors_are_read(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    tensor = torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn)
    save_file({"w": tensor}, path)
    with open_safetensors(path) as checkpoint:
        assert checkpoint.info("w").dtype == torch.float8_e4m3fn
        assert torch.equal(checkpoint.load("w").float(), tensor.float())


def test_unknown_key_names_the_file_and_the_closest_key(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(1)}, path)
    with open_safetensors(path) as checkpoint:
        with pytest.raises(CheckpointError, match=r"model\.safetensors.*did you mean 'model\.diffusion"):
            checkpoint.info("model.diffusion_model.out.2.weigth")


def test_metadata_is_read_only(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1)}, path, metadata={"sd_merge_recipe": "{}"})
    with open_safetensors(path) as checkpoint:
        with pytest.raises(TypeError):
            checkpoint.metadata["sd_merge_recipe"] = "x"  # type: ignore[index]


def test_load_after_close_raises(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1)}, path)
    checkpoint = open_safetensors(path)
    checkpoint.load("w")
    checkpoint.close()
    with pytest.raises(ValueError, match=rf"^checkpoint {path} is closed$"):
        checkpoint.load("w")


def test_unknown_suffix_with_safetensors_content_is_read_as_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "model.weights"
    save_file({"w": torch.ones(2)}, path)
    with open_file_checkpoint(path) as checkpoint:
        assert torch.equal(checkpoint.load("w"), torch.ones(2))


def test_a_run_of_keys_back_to_back_in_one_dtype_is_one_view_else_none(tmp_path: Path) -> None:
    """``load_run``: the export's flat view over small keys (one call per run instead of per key)."""
    tensors = {f"k{i}": torch.full((i + 1, 2), float(i)) for i in range(4)} | {"z": torch.ones(3).half()}
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    with open_safetensors(path) as checkpoint:
        order = sorted(checkpoint.keys(), key=lambda key: checkpoint._entries[key][1])  # the file's order
        floats = [key for key in order if key != "z"]
        run = checkpoint.load_run(floats)
        assert run is not None and run.dtype == torch.float32
        assert torch.equal(run, torch.cat([tensors[key].flatten() for key in floats]))
        assert run.data_ptr() == checkpoint.load(floats[0]).data_ptr()  # a view of the map, not a copy
        assert checkpoint.load_run(floats[::2]) is None  # not back to back
        assert checkpoint.load_run([*floats, "z"]) is None and checkpoint.load_run(["z", *floats]) is None
        assert checkpoint.load_run(list(reversed(floats))) is None
        assert checkpoint.load_run([]) is None


def test_files_sharing_a_key_table_with_headers_of_other_lengths_each_view_their_own_run(
    tmp_path: Path,
) -> None:
    """A run is worked out once per shared key table (``_Layout.derived``), as offsets within the data
    section: two files with the same table but metadata of other lengths (data sections at other
    places) each view their own bytes; an unknown key is named for the file asked, every time."""
    tensors = {f"k{i}": torch.full((i + 1,), float(i)) for i in range(3)}
    paths = []
    for metadata, scale in [({"a": "b"}, 1.0), ({"a": "b" * 41}, 2.0)]:
        paths.append(tmp_path / f"m{len(paths)}.safetensors")
        save_file({key: value * scale for key, value in tensors.items()}, paths[-1], metadata=metadata)
    with open_safetensors(paths[0]) as first, open_safetensors(paths[1]) as second:
        assert first._layout is second._layout
        order = sorted(first.keys(), key=lambda key: first._entries[key][1])
        for checkpoint, scale in [(first, 1.0), (second, 2.0), (first, 1.0)]:
            run = checkpoint.load_run(order)
            assert run is not None
            assert torch.equal(run, torch.cat([tensors[key] * scale for key in order]))
        for checkpoint in (first, second, first):
            with pytest.raises(CheckpointError, match=checkpoint.path.name):
                checkpoint.load_run([*order, "missing"])


def _resident_pages(address: int, length: int) -> int | None:
    """How many pages of [address, address + length) are in memory (``mincore``); None off Linux."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    start = address - address % mmap.PAGESIZE
    pages = (address + length - start + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vector = (ctypes.c_ubyte * pages)()
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * mmap.PAGESIZE), vector) != 0:
        return None
    return sum(v & 1 for v in vector)


@pytest.mark.parametrize("requested_first", [False, True])
def test_read_ahead_brings_the_keys_pages_in_and_changes_no_tensor(
    tmp_path: Path, requested_first: bool
) -> None:
    """``read_ahead`` of some keys (adjacent ones joined, an empty one, a repeated one), alone or after
    ``request`` (the reads queued first, as the export's read-ahead does): their pages are in memory
    afterwards where they were not (checked where the file system can drop them), the tensors load as
    stored, and after ``close`` both do nothing."""
    import os

    from automerge.checkpoints._paging import map_address

    generator = torch.Generator().manual_seed(3)
    tensors = {f"k{i}": torch.randn(300_000, generator=generator) for i in range(4)} | {
        "empty": torch.empty(0)
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    with open_safetensors(path) as checkpoint:
        keys = ["k1", "k2", "empty", "k1"]
        view = checkpoint.load("k1")
        begin, length = view.data_ptr(), 2 * view.numel() * 4
        del view
        with path.open("rb") as file:
            os.fsync(file.fileno())  # dirty pages would stay
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        pages = (begin + length - 1) // mmap.PAGESIZE - begin // mmap.PAGESIZE + 1
        before = _resident_pages(begin, length)
        if requested_first:
            checkpoint.request(keys)
        checkpoint.read_ahead(keys)
        if before is not None and before < pages:  # a file system whose cache can drop the pages
            assert _resident_pages(begin, length) == pages
        assert map_address(checkpoint._open_map()) <= begin
        for key, tensor in tensors.items():
            assert torch.equal(checkpoint.load(key), tensor)
    checkpoint.request(keys)  # closed: nothing
    checkpoint.read_ahead(keys)


def _raw_safetensors(path: Path, entries: dict[str, Any], data: bytes, metadata: dict[str, str]) -> Path:
    body = json.dumps({"__metadata__": metadata, **entries}).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def test_files_with_one_tensor_table_share_it_and_a_different_table_is_validated_anew(tmp_path: Path) -> None:
    """Sources written alike (other metadata, the same tensors) share the validated table; a file
    whose table differs where the cache's quick fingerprint does not look (same size, count and
    first name; a tensor overlapping another) is validated on its own and refused."""
    entries = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
    }
    first = open_safetensors(_raw_safetensors(tmp_path / "1.safetensors", entries, bytes(16), {"n": "1"}))
    second = open_safetensors(_raw_safetensors(tmp_path / "2.safetensors", entries, bytes(16), {"n": "2"}))
    assert second.metadata == {"n": "2"}
    assert first._layout is second._layout and second.info("b") == TensorInfo((2,), torch.float32)
    overlapping = entries | {"b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    path = _raw_safetensors(tmp_path / "3.safetensors", overlapping, bytes(16), {"n": "1"})
    with pytest.raises(CheckpointError, match="overlaps tensor 'a'"):
        open_safetensors(path)
    first.close()
    second.close()
