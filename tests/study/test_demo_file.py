"""The shipped study files parse, and the demo's search space fits the family it generates."""

from __future__ import annotations

from pathlib import Path

import pytest

from automerge.arch import ARCHITECTURES
from automerge.merge import METHODS
from automerge.study import load_study_file
from automerge.study.space import build_space

STUDIES = Path(__file__).parents[2] / "studies"


SELF_CONTAINED = sorted(p for p in STUDIES.glob("*.yaml") if "\ngenerate:" in p.read_text(encoding="utf-8"))
# The examples that name the user's own checkpoints are checked with tiny models swapped in:
# tests/study/test_dry_run.py::test_every_example_study_checks_and_plans_with_its_models_swapped_for_tiny_ones


@pytest.mark.parametrize("path", SELF_CONTAINED, ids=lambda p: p.name)
def test_shipped_study_files_are_valid(path: Path) -> None:
    study = load_study_file(path)
    family = next(iter(study.generate.values())).tiny if study.generate else "sd1"
    space = build_space(study, ARCHITECTURES.get(family), METHODS.get(study.method))
    assert space.dimensions


def test_demo_target_names_every_block_it_searches() -> None:
    study = load_study_file(STUDIES / "demo.yaml")
    searched = {b for group in study.search["alpha"].groups.values() for b in group}
    assert searched == set(study.reward.reference.target.params["alpha"])


def test_generate_writes_the_missing_tiny_models_each_like_one_after_its_base(make_study, tmp_path) -> None:
    """``generate:`` (the demo's self-contained models): each missing model is written to its
    ``models:`` path, a ``like`` one as a variation of its base; an existing file is left as it is."""
    from safetensors.torch import load_file

    from automerge.study.runtime import generate_models

    models = {"a": str(tmp_path / "gen" / "a.safetensors"), "b": str(tmp_path / "gen" / "b.safetensors")}
    generate = {"b": {"tiny": "sd1", "seed": 2, "like": "a", "delta": 0.5}, "a": {"tiny": "sd1", "seed": 1}}
    study = load_study_file(make_study(models=models, generate=generate))
    generate_models(study)
    a, b = (load_file(study.models[name]) for name in "ab")
    assert a.keys() == b.keys() and any(not a[key].equal(b[key]) for key in a)
    written = study.models["a"].stat().st_mtime_ns
    generate_models(study)
    assert study.models["a"].stat().st_mtime_ns == written
