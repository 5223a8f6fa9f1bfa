"""The shipped study files parse, and the demo's search space fits the family it generates."""

from __future__ import annotations

from pathlib import Path

import pytest

from automerge.arch import ARCHITECTURES
from automerge.merge import METHODS
from automerge.study import load_study_file
from automerge.study.space import build_space

STUDIES = Path(__file__).parents[2] / "studies"


@pytest.mark.parametrize("path", sorted(STUDIES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_study_files_are_valid(path: Path) -> None:
    study = load_study_file(path)
    family = next(iter(study.generate.values())).tiny if study.generate else "sd1"
    space = build_space(study, ARCHITECTURES.get(family), METHODS.get(study.method))
    assert space.dimensions


def test_demo_target_names_every_block_it_searches() -> None:
    study = load_study_file(STUDIES / "demo.yaml")
    searched = {b for group in study.search["alpha"].groups.values() for b in group}
    assert searched == set(study.reward.reference.target.params["alpha"])
