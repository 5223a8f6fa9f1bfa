"""Fuzzing the study loader (issue 13): whatever a study file holds — YAML of any shape near the real
schema, or arbitrary text — loading it gives a study or automerge's own one-line error, never another
exception (bounded and derandomised, so CI runs the same cases every time)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from fuzzing import FUZZ
from hypothesis import given
from hypothesis import strategies as st

from automerge.errors import AutomergeError
from automerge.study import load_study_file

KEYS = [
    "name", "models", "method", "search", "params", "payloads", "reward", "sampler", "trials", "timeout",
    "early_stopping", "storage", "heartbeat", "export", "render", "seed", "baselines", "pruner",
    "multi_fidelity", "generate", "validation_payloads", "alpha", "a", "b", "groups", "blocks", "low",
    "high", "step", "IN00", "BASE", "device", "dir", "interval", "grace", "patience", "reference", "metric",
]  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True),
    st.sampled_from(
        ["a.safetensors", "payload.yaml", "weighted_sum", "tpe", "cpu", "8h", "../x", "[/x]", ""]
    ),
    st.text(max_size=8),
)
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=5)), inner, max_size=5),
    ),
    max_leaves=25,
)
BASE = {
    "name": "fuzz",
    "models": {"a": "a.safetensors", "b": "b.safetensors"},
    "search": {"alpha": {}},
    "payloads": ["payload.yaml"],
    "reward": {"reference": {"metric": "mse", "target": {"params": {"alpha": 0.3}}}},
}


def _load(text: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        for name in ("a.safetensors", "b.safetensors", "payload.yaml"):
            (Path(folder) / name).write_text("")
        path = Path(folder) / "study.yaml"
        path.write_text(text)
        try:
            load_study_file(path)
        except AutomergeError as error:
            assert "\n" not in str(error).strip()


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS), documents, max_size=6))
def test_a_valid_study_with_any_fields_changed_loads_or_is_refused_in_one_line(changes: dict) -> None:
    _load(yaml.safe_dump({**BASE, **changes}))


@FUZZ
@given(documents)
def test_any_yaml_document_loads_or_is_refused_in_one_line(document: object) -> None:
    _load(yaml.safe_dump(document))


@FUZZ
@given(st.text(max_size=200))
def test_any_text_loads_or_is_refused_in_one_line(text: str) -> None:
    _load(text)
