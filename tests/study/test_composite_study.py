"""A study whose reward is a composite with a z-scored member (issue 15: the study never set the
baseline statistics, so every trial failed with "z-scored but no baseline was set")."""

from __future__ import annotations

from pathlib import Path

import yaml
from rich.console import Console

from automerge.study import StudyRuntime, load_study_file, run_study
from automerge.testing.tiny_rewards import write_tiny_clip_score, write_tiny_laion_aesthetic


def _composite(tmp_path: Path) -> Path:
    aesthetic = write_tiny_laion_aesthetic(tmp_path / "aesthetic")
    clip = write_tiny_clip_score(tmp_path / "clip")
    path = tmp_path / "mix.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "reward": "composite",
                "name": "mix",
                "members": [
                    {"manifest": str(aesthetic), "weight": 1.0, "normalize": "zscore"},
                    {"manifest": str(clip), "weight": 2.0, "normalize": "zscore"},
                ],
            }
        )
    )
    return path


def test_a_zscored_composite_runs_through_a_real_study(make_study, tmp_path: Path) -> None:
    path = make_study(trials=5, reward=str(_composite(tmp_path)))
    summary = run_study(load_study_file(path), console=Console(quiet=True), export=False)
    assert summary.completed == 5 and summary.best_value is not None


def test_the_zscore_statistics_come_from_the_baseline_renders_and_are_reproducible(
    make_study, tmp_path
) -> None:
    """μ, σ of each z-scored member are fitted on the renders of the space's baselines (pure A, pure B,
    uniform midpoint) at start; every worker computes the same ones."""
    path = make_study(reward=str(_composite(tmp_path)))
    fitted = []
    for _ in range(2):
        runtime = StudyRuntime(load_study_file(path))
        try:
            fitted.append({name: (z.mean, z.std) for name, z in runtime.reward._zscores.items()})
        finally:
            runtime.close()
    assert fitted[0] == fitted[1] and set(fitted[0]) == {"laion-aesthetic", "clip-score"}
    assert all(std > 0 for _, std in fitted[0].values())
