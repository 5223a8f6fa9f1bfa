"""Fuzzing the safetensors reader (issue 13): whatever bytes a file holds, opening it and reading every
tensor it announces ends in a tensor or in automerge's own ``CheckpointError``, never in another
exception (bounded: a fixed number of derandomised examples, so CI runs the same cases every time)."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

from fuzzing import FUZZ
from hypothesis import given
from hypothesis import strategies as st

from automerge.checkpoints import open_safetensors
from automerge.errors import CheckpointError

DTYPES = [
    "F16",
    "BF16",
    "F32",
    "F64",
    "I8",
    "U8",
    "I16",
    "I32",
    "I64",
    "BOOL",
    "F8_E4M3",
    "F4",
    "Q8",
    "",
    "f32",
]
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=0, max_value=64),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
)
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(st.sampled_from(DTYPES), numbers),
        "shape": st.one_of(st.lists(st.integers(min_value=-2, max_value=8), max_size=4), numbers),
        "data_offsets": st.one_of(st.lists(st.integers(min_value=-4, max_value=300), max_size=3), numbers),
        "extra": numbers,
    },
)
metadata = st.one_of(
    st.dictionaries(st.text(max_size=6), st.one_of(st.text(max_size=6), numbers), max_size=3), numbers
)
headers = st.dictionaries(
    st.one_of(
        st.sampled_from(["__metadata__", "model.diffusion_model.out.2.bias", "a", ""]), st.text(max_size=8)
    ),
    st.one_of(entries, metadata, numbers),
    max_size=5,
)


def _check(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.safetensors"
        path.write_bytes(content)
        try:
            checkpoint = open_safetensors(path)
        except CheckpointError:
            return
        try:
            for key in checkpoint.keys():
                info = checkpoint.info(key)
                tensor = checkpoint.load(key)
                assert tuple(tensor.shape) == tuple(info.shape) and tensor.dtype == info.dtype
        except CheckpointError:
            pass
        finally:
            checkpoint.close()


@FUZZ
@given(headers, st.binary(max_size=300), st.one_of(st.none(), st.integers(min_value=0, max_value=2**64 - 1)))
def test_any_json_header_opens_or_is_refused_with_a_checkpoint_error(
    header: dict, data: bytes, length: int | None
) -> None:
    text = json.dumps(header).encode()
    _check(struct.pack("<Q", len(text) if length is None else length) + text + data)


@FUZZ
@given(st.binary(max_size=400))
def test_any_bytes_open_or_are_refused_with_a_checkpoint_error(content: bytes) -> None:
    _check(content)
