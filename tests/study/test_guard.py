"""The guard against reward hacking (issue 18): a proxy built to diverge from its guard. The proxy
prefers saturated images (a reward made here); the guard is the MSE similarity to a hidden target
merged at α = 0.5. On these tiny models saturation falls steadily from α = 0 (A) to α = 1 (B), so the
trials, queued from α = 1 down to α = 0, each beat the last on the proxy, while the guard improves up to
α = 0.5 and then gets worse: it must warn at the first trial whose drop exceeds its noise, and with
``stop: true`` end the study there and export the last best it agreed with."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from rich.console import Console

from automerge.arch import ARCHITECTURES
from automerge.merge import load_recipe
from automerge.render.checks import image_stats
from automerge.rewards.base import REWARDS, RewardPlugin
from automerge.study import default_storage, load_study_file, run_study
from automerge.study.guard import (
    GuardCheck,
    GuardWatch,
    guard_noise,
    guard_verdict,
    read_checks,
    standard_error,
)
from automerge.study.runner import open_study

ALPHAS = [1.0, 0.75, 0.5, 0.375, 0.25, 0.125, 0.0]  # saturation rises along these


class Saturation(RewardPlugin):
    """A proxy that is easy to game: the mean saturation of the image (render/checks.py)."""

    uses_prompts = False

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def load(cls, request: Any) -> Saturation:
        return cls(request.manifest.display_name(request.manifest_path))

    def score(self, images, prompts, *, keys=None) -> list[float]:
        return [image_stats(image).saturation for image in images]


@pytest.fixture
def saturation_reward(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setitem(REWARDS._entries, "test-saturation", Saturation)
    manifest = tmp_path / "saturation.yaml"
    manifest.write_text(yaml.safe_dump({"reward": "test-saturation", "name": "saturation"}))
    return manifest


def _guard_study(
    folder: Path, tiny_models: dict[str, Path], reward: Path, alphas: list[float] = ALPHAS, **guard: Any
) -> Path:
    (folder / "payload.yaml").write_text(
        yaml.safe_dump(
            {
                "defaults": {"steps": 2, "cfg": 1.0, "width": 64, "height": 64, "scheduler": "euler"},
                "items": [
                    {"prompt": "a red house", "seeds": [1, 2, 3]},
                    {"prompt": "a blue boat", "seeds": [1, 2, 3]},
                ],
            }
        )
    )
    unet_and_text = [block for block in ARCHITECTURES.get("sd1").blocks if block != "VAE"]
    study = {
        "name": "guarded",
        "models": {"a": str(tiny_models["a"]), "b": str(tiny_models["b"])},
        "search": {"alpha": {"groups": {"ALL": unet_and_text}}},
        "payloads": ["payload.yaml"],
        "reward": str(reward),
        "guard": {
            "rewards": [
                {"reference": {"metric": "mse", "target": {"params": {"alpha": 0.5}}}, "name": "near-mid"}
            ],
            "payloads": "study",
            **guard,
        },
        "sampler": {"name": "random", "seed": 0},
        "baselines": False,
        "trials": len(alphas),
        "early_stopping": None,
        "render": {"device": "cpu"},
        "export": {"dir": str(folder / "out")},
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    queued = open_study(load_study_file(path))
    for alpha in alphas:
        queued.enqueue_trial({"alpha.ALL": alpha})
    return path


def _run(path: Path) -> tuple[Any, list[str], optuna.Study]:
    console = Console(record=True, width=400)
    study_file = load_study_file(path)
    summary = run_study(study_file, console=console)
    stored = optuna.load_study(study_name=study_file.name, storage=default_storage(study_file))
    return summary, console.export_text().splitlines(), stored


def _alpha(stored: optuna.Study, number: int) -> float:
    return stored.trials[number].params["alpha.ALL"]


def test_the_guard_stops_at_the_first_disagreement_and_exports_the_last_agreed_best(
    tmp_path: Path, tiny_models: dict[str, Path], saturation_reward: Path
) -> None:
    path = _guard_study(tmp_path, tiny_models, saturation_reward, stop=True)
    summary, lines, stored = _run(path)
    values = [t.value for t in stored.trials if t.value is not None]
    assert values == sorted(values) and len(set(values)) == len(values)  # every trial a new best
    checks = read_checks(stored)
    verdict = guard_verdict(checks)
    # the guard peaks at the target (α = 0.5, MSE 0) and disagrees at the first best past it whose
    # drop exceeds its noise; every best before that agreed
    peak = max(checks, key=lambda c: c.scores["near-mid"])
    assert _alpha(stored, peak.trial) == 0.5 and peak.scores["near-mid"] == 0.0
    diverged = verdict.diverged_at
    assert diverged is not None and _alpha(stored, diverged) < 0.5
    band = verdict.bands["near-mid"]
    assert 0 < band
    running_peak = -math.inf
    for check in checks:  # rising towards the target, then within the band of it, until `diverged`
        if check.trial < diverged:
            assert check.scores["near-mid"] >= running_peak - band
            running_peak = max(running_peak, check.scores["near-mid"])
    assert running_peak == 0.0
    assert next(c for c in checks if c.trial == diverged).scores["near-mid"] < -band
    # stopped there: no trial after it ran; the export is the trial before it (the last agreed)
    assert [t.number for t in stored.trials if t.state.is_finished()] == list(range(diverged + 1))
    assert verdict.agreed == diverged - 1
    assert summary.stop_reason == f"stopped by the guard at trial {diverged} (guard.stop)"
    assert sum(line.startswith(f"guard: from trial {diverged} on the proxy improves") for line in lines) == 1
    assert f"exporting trial {diverged - 1}, the last best the guard agreed with (guard.stop)" in lines
    recipe = load_recipe(tmp_path / "out" / "recipe.yaml")
    assert recipe.params["alpha"] == _alpha(stored, diverged - 1)  # one α for every block
    report = (tmp_path / "out" / "report.html").read_text()
    assert (
        "Guard: the proxy against a held-out panel" in report and f"disagrees from trial {diverged}" in report
    )
    # a resumed run does not go on past the guard's stop
    again, lines, _ = _run(path)
    assert again.ran == 0 and any("run with --trials N" in line for line in lines)


def test_without_stop_the_guard_warns_once_and_the_best_is_exported(
    tmp_path: Path, tiny_models: dict[str, Path], saturation_reward: Path
) -> None:
    alphas = [0.625, 0.5, 0.25, 0.0]  # the guard peaks at trial 1 (α = 0.5) and disagrees from trial 2
    path = _guard_study(tmp_path, tiny_models, saturation_reward, alphas, every=1)
    summary, lines, stored = _run(path)
    assert summary.ran == len(alphas) and summary.best_trial == len(alphas) - 1
    assert summary.stop_reason == ""  # warned, not stopped: the budget ended the run
    diverged = guard_verdict(read_checks(stored)).diverged_at
    assert diverged == 2
    warnings = [line for line in lines if line.startswith("guard: from trial")]
    assert len(warnings) == 2  # at the trial it started, and again at the export
    assert f"automerge export --trial {diverged - 1} exports the last agreed best" in " ".join(lines)
    recipe = load_recipe(tmp_path / "out" / "recipe.yaml")
    assert recipe.params["alpha"] == 0.0


def test_every_k_guards_the_best_at_most_once_per_k_trials_and_the_last_best_at_the_end() -> None:
    guarded: list[float] = []

    def score(params):
        guarded.append(params["x"])
        return {"g": -params["x"]}, {"g": {"p0-i00-s0001": -params["x"], "p0-i00-s0002": -params["x"]}}

    study = optuna.create_study(direction="maximize")
    watch = GuardWatch(score, maximize={"g": True}, every=3)
    for x in [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]:
        study.enqueue_trial({"x": x})
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1, callbacks=[watch])
    # trial 0 at once (the first best), then the best at most every 3 completed trials
    assert guarded == [0.1, 0.4, 0.7]
    study.enqueue_trial({"x": 0.8})
    watch_every_10 = GuardWatch(score, maximize={"g": True}, every=10)
    watch_every_10.since_check = 0
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1, callbacks=[watch_every_10])
    assert guarded == [0.1, 0.4, 0.7]
    watch_every_10.finish(study)
    assert guarded == [0.1, 0.4, 0.7, 0.8]


def _check(
    trial: int, proxy: float, guard: float, *, baseline: bool = False, spread: float = 0.1
) -> GuardCheck:
    images = {"p0-i00-s0001": guard - spread, "p0-i00-s0002": guard + spread}
    return GuardCheck(trial, proxy, {"g": guard}, {"g": images}, {"g": True}, baseline)


def test_standard_error_pools_the_seed_spread_of_each_prompt() -> None:
    # two prompts, three seeds each: deviations ±1, 0 around 10 and around 20 → s² = 4 / 4 = 1
    scores = {
        "p0-i00-s0001": 9.0,
        "p0-i00-s0002": 10.0,
        "p0-i00-s0003": 11.0,
        "p0-i01-s0001": 19.0,
        "p0-i01-s0002": 20.0,
        "p0-i01-s0003": 21.0,
    }
    assert standard_error(scores) == pytest.approx(math.sqrt(1 / 6))
    # one seed per prompt: the spread over all images stands in (values 1, 3: s² = 2, n = 2)
    assert standard_error({"p0-i00-s0001": 1.0, "p0-i01-s0001": 3.0}) == pytest.approx(1.0)
    assert standard_error({"p0-i00-s0001": 1.0}) == 0.0


def test_the_noise_comes_from_the_baselines_and_else_from_the_first_check() -> None:
    first = _check(0, 1.0, 0.0, spread=0.5)
    baselines = [
        _check(1, 0.5, 0.0, baseline=True, spread=0.1),
        _check(2, 0.4, 0.0, baseline=True, spread=0.3),
    ]
    # two images ±s around the mean: s² = 2s², SE = √(2s² / 2) = s; baselines: √((0.1² + 0.3²) / 2)
    assert guard_noise([first])["g"] == pytest.approx(0.5)
    assert guard_noise([first, *baselines])["g"] == pytest.approx(math.sqrt((0.01 + 0.09) / 2))
    assert guard_noise([]) == {}


def test_the_verdict_follows_the_bests_and_a_later_agreement_ends_a_disagreement() -> None:
    band = 2 * 0.1  # spread 0.1 → SE 0.1
    checks = [
        _check(0, 1.0, 0.0),
        _check(1, 0.5, -5.0),  # not a best (proxy lower): ignored, however bad its guard
        _check(2, 2.0, 1.0),  # agreed, guard peak 1.0
        _check(3, 3.0, 1.0 - band + 0.01),  # within the band: agreed
        _check(4, 4.0, 1.0 - band - 0.01),  # beyond it: disagrees
        _check(5, 5.0, 0.0),  # still disagreeing
    ]
    verdict = guard_verdict(checks)
    assert [c.trial for c in verdict.bests] == [0, 2, 3, 4, 5]
    assert (verdict.agreed, verdict.diverged_at) == (3, 4)
    assert verdict.reason.startswith("guard: from trial 4 on the proxy improves (score 4)")
    assert "the last best it agreed with is trial 3" in verdict.reason
    recovered = guard_verdict([*checks, _check(6, 6.0, 1.1)])
    assert (recovered.agreed, recovered.diverged_at, recovered.reason) == (6, None, "")
    # a minimized member: lower is better
    low = [
        GuardCheck(0, 1.0, {"d": 1.0}, {"d": {"k-s1": 0.9, "k-s2": 1.1}}, {"d": False}),
        GuardCheck(1, 2.0, {"d": 2.0}, {"d": {"k-s1": 1.9, "k-s2": 2.1}}, {"d": False}),
    ]
    assert guard_verdict(low).diverged_at == 1
    assert guard_verdict(low, tolerance=20).diverged_at is None


def test_the_export_picks_the_agreed_best_at_the_study_files_tolerance() -> None:
    """``automerge export`` reads the stored checks with ``guard.tolerance`` from the study file."""
    from types import SimpleNamespace

    from automerge.study.export import _guard_choice
    from automerge.study.guard import check_attr

    study = optuna.create_study(direction="maximize")
    for check in (_check(0, 1.0, 1.0), _check(1, 2.0, 0.5)):  # a drop of 0.5: 5 SE
        study.set_user_attr(check_attr(check.trial), check.as_attr())

    def study_file(tolerance: float) -> Any:
        return SimpleNamespace(guard=SimpleNamespace(tolerance=tolerance))

    agreed, reason = _guard_choice(study_file(2.0), study)
    assert agreed == 0 and reason.startswith("guard: from trial 1 on the proxy improves")
    assert _guard_choice(study_file(10.0), study) is None  # within 10 SE: the best is agreed
    assert _guard_choice(SimpleNamespace(guard=None), study) is None


def test_a_baseline_that_is_also_the_best_is_guarded_once() -> None:
    guarded: list[float] = []

    def score(params):
        guarded.append(params["x"])
        return {"g": 0.0}, {"g": {"p0-i00-s0001": 0.0}}

    study = optuna.create_study(direction="maximize")
    watch = GuardWatch(score, maximize={"g": True}, every=1)
    study.enqueue_trial({"x": 0.5}, user_attrs={"baseline": "A"})
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1, callbacks=[watch])
    assert guarded == [0.5] and read_checks(study)[0].baseline


def test_the_study_loops_guard_warns_in_the_terminal_and_its_renders_restart_the_sampler_clock() -> None:
    """``runner._guard_watch``: the guard's disagreement is printed (its text, in yellow), and a trial's
    sampler time starts after the guard's renders, not before them."""
    import io
    from types import SimpleNamespace

    from automerge.study.config import GuardConfig
    from automerge.study.runner import _guard_watch

    scored: list[dict[str, float]] = []
    events: list[str] = []

    def guard_scores(values):
        scored.append(dict(values))
        events.append("scored")
        return {"g": 0.5}, {"g": {"p0-i00-s0001": 0.5}}

    runtime = SimpleNamespace(
        study=SimpleNamespace(guard=GuardConfig(every=3, tolerance=4.0, stop=True)),
        guard=SimpleNamespace(members=[SimpleNamespace(name="g", direction="minimize")]),
        guard_scores=guard_scores,
    )
    objective = SimpleNamespace(restart_sampler_clock=lambda: events.append("sampler clock restarted"))
    console = Console(file=io.StringIO(), width=200)
    watch = _guard_watch(runtime, objective, console)  # type: ignore[arg-type]
    assert watch is not None
    assert (watch.maximize, watch.every, watch.tolerance, watch.stop) == ({"g": False}, 3, 4.0, True)
    watch.warn("guard: from trial 4 on the proxy improves (score 0.9)")
    assert console.file.getvalue() == "guard: from trial 4 on the proxy improves (score 0.9)\n"
    # a reason quoting a torch error or a path is printed as it is, not read as markup (it was: a
    # "[enforce fail …]" vanished and a "[/]" raised MarkupError inside the study loop's callback)
    watch.warn("guard failed: [enforce fail at alloc_cpu.cpp:114] in studies/[a]/s.yaml [/]")
    assert console.file.getvalue().endswith(
        "guard failed: [enforce fail at alloc_cpu.cpp:114] in studies/[a]/s.yaml [/]\n"
    )
    assert watch.score({"x": 0.25}) == ({"g": 0.5}, {"g": {"p0-i00-s0001": 0.5}})
    assert scored == [{"x": 0.25}] and events == ["scored", "sampler clock restarted"]  # after its renders
    runtime.study.guard = None
    assert _guard_watch(runtime, objective, console) is None  # type: ignore[arg-type]
