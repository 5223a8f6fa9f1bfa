"""The search space maps Optuna's values straight to ``BlockParams`` through a template checked once;
trial records are read back typed; the best trial is chosen in one place."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from automerge.arch import ARCHITECTURES
from automerge.errors import ConfigError
from automerge.merge import METHODS, resolve_params
from automerge.study import TrialRecord, best_trial, load_study_file, records
from automerge.study.space import build_space

SD1 = ARCHITECTURES.get("sd1")


def _study(tmp_path: Path, tiny_models: dict[str, Path], **changes: object) -> Path:
    payload = tmp_path / "payload.yaml"
    payload.write_text(
        yaml.safe_dump(
            {"defaults": {"steps": 2, "width": 64, "height": 64, "seeds": [1]}, "items": [{"prompt": "x"}]}
        )
    )
    reward = {"reference": {"metric": "mse", "folder": str(tmp_path)}}
    data = {
        "name": "s",
        "models": {name: str(tiny_models[name]) for name in "abc"},
        "method": "ties",
        "search": {"density": {"groups": {"IN": ["IN00", "IN01"], "OUT": ["OUT11"]}}},
        "params": {"alpha": {"default": 0.5, "M00": 0.9}},
        "payloads": [str(payload)],
        "reward": reward,
        **changes,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_proposal_gives_the_parameters_the_recipe_form_would(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    study = load_study_file(_study(tmp_path, tiny_models))
    method = METHODS.get("ties")
    space = build_space(study, SD1, method)
    got = space.block_params({"density.IN": 0.2, "density.OUT": 0.7})
    raw = {"alpha": {"default": 0.5, "M00": 0.9}, "density": {"IN00": 0.2, "IN01": 0.2, "OUT11": 0.7}}
    assert got == resolve_params(method, raw, blocks=SD1.blocks, source="t")
    assert got.for_block("IN02") == {"alpha": 0.5, "density": 0.5}  # the method's default elsewhere
    assert not got.merges("VAE")


def test_a_searched_vae_is_merged_in_every_proposal(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    search = {"density": {"blocks": ["VAE", "BASE"]}}
    space = build_space(
        load_study_file(_study(tmp_path, tiny_models, search=search)), SD1, METHODS.get("ties")
    )
    params = space.block_params({"density.VAE": 0.3, "density.BASE": 0.4})
    assert params.merges("VAE") and params.for_block("VAE")["density"] == 0.3


def test_fixed_params_are_checked_once_when_the_space_is_built(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    study = load_study_file(_study(tmp_path, tiny_models, params={"alpha": {"IN99": 0.5}}))
    with pytest.raises(ConfigError, match="names block 'IN99'"):
        build_space(study, SD1, METHODS.get("ties"))


def _trial(study: optuna.Study, value: float | None, **attrs: object) -> None:
    trial = study.ask()
    trial.suggest_float("alpha.BASE", 0.0, 1.0)
    for key, item in attrs.items():
        trial.set_user_attr(key, item)
    if value is None:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    else:
        study.tell(trial, value)


def test_records_read_back_what_the_objective_wrote_and_ties_go_to_the_earliest() -> None:
    study = optuna.create_study(direction="maximize")
    _trial(study, 0.5, **records.baseline_attrs("A"))
    _trial(study, None, **{records.FAIL_REASON: "RenderError: NaN"})
    _trial(study, 0.9, **{records.TIMINGS: {"merge": 0.25}, records.IMAGES: {"p0-i00-s0001": "id"}})
    _trial(study, 0.9)
    first, failed, best, tied = [TrialRecord.of(t) for t in study.trials]
    assert first.baseline == "A" and first.label == "A" and best.label == "trial 2"
    assert failed.value is None and failed.fail_reason == "RenderError: NaN"
    assert best.timings == {"merge": 0.25} and best.images == {"p0-i00-s0001": "id"}
    assert best_trial(study.trials).number == 2
    assert best_trial([]) is None
    assert first.value == 0.5 and first.values == (0.5,)


def test_a_trial_writes_its_timings_and_scores_rounded_and_a_front_trial_has_no_single_value() -> None:
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    records.write_timings(trial, {"merge": 0.123456789, "render": 2.0})
    records.write_evaluation(
        trial, payload_scores=[0.5], reward_scores={"r": 0.5}, images={}, image_scores={"k": 0.25}
    )
    study.tell(trial, 0.5)
    record = TrialRecord.of(study.trials[0])
    assert dict(record.timings) == {"merge": 0.123457, "render": 2.0}
    assert dict(record.image_scores) == {"k": 0.25}
    several = optuna.create_study(directions=["maximize", "maximize"])
    several.optimize(lambda t: (1.0, 2.0), n_trials=1)
    front = TrialRecord.of(several.trials[0])
    assert front.value is None and front.values == (1.0, 2.0)


def test_a_study_names_its_reward_manifest_by_name(make_study, tmp_path: Path) -> None:
    """`reward: clip-score` finds rewards/clip-score.yaml (beside the study, else bundled), as
    `rewards fetch` and `score` take names; a misspelt name lists the known ones."""
    path = make_study(reward="pickscore")
    study = load_study_file(path)
    assert study.reward == (Path(__file__).resolve().parents[2] / "rewards" / "pickscore.yaml")
    (tmp_path / "rewards").mkdir(exist_ok=True)
    own = tmp_path / "rewards" / "pickscore.yaml"
    own.write_text("reward: clip_score\n")
    assert load_study_file(path).reward == own.resolve()
    with pytest.raises(
        ConfigError, match=r"reward: no reward manifest 'pickscor' \(did you mean 'pickscore'"
    ):
        load_study_file(make_study(reward="pickscor"))
    with pytest.raises(ConfigError, match=r"reward: manifest .*nothere.yaml does not exist"):
        load_study_file(make_study(reward="nothere.yaml"))


def test_a_non_finite_score_names_the_objective_only_when_there_are_several() -> None:
    from automerge.errors import StudyError
    from automerge.rewards.scoring import ScoreResult
    from automerge.study.runtime import LoadedObjective, _evaluation, _Tally

    def tally(score: float) -> _Tally:
        tally = _Tally()
        tally.add(["k"], [1.0], ScoreResult((score,), ()))
        return tally

    def objective(name: str) -> LoadedObjective:
        return LoadedObjective(name, "maximize", None)  # type: ignore[arg-type]

    with pytest.raises(
        StudyError, match=r"^the trial score is nan \(a reward returned a non-finite value\)$"
    ):
        _evaluation([objective("aesthetic")], [tally(float("nan"))], {}, {})
    with pytest.raises(StudyError, match=r"^objective clip's score is inf "):
        _evaluation([objective("aesthetic"), objective("clip")], [tally(1.0), tally(float("inf"))], {}, {})


def test_evaluate_reports_each_stage_as_it_starts_and_records_a_time_for_each(make_study) -> None:
    from automerge.study import StudyRuntime

    runtime = StudyRuntime(load_study_file(make_study()))
    try:
        stages: list[str] = []
        evaluation = runtime.evaluate(
            runtime.space.block_params(runtime.space.baselines()[2].values),
            runtime.jobs,
            on_stage=stages.append,
        )
        payloads = len({job.payload for job in runtime.jobs})
        assert stages == ["merge"] + ["render", "score"] * payloads
        assert set(evaluation.timings) == {"merge", "render", "score"}  # the values: BENCHMARKS.md
    finally:
        runtime.close()


def test_optuna_logs_only_errors_unless_automerge_logs_at_debug() -> None:
    import logging

    from automerge.study.storage import quiet_optuna

    logger = logging.getLogger("automerge")
    level = logger.level
    try:
        logger.setLevel(logging.INFO)
        quiet_optuna()
        assert optuna.logging.get_verbosity() == optuna.logging.ERROR
        logger.setLevel(logging.DEBUG)  # --debug
        quiet_optuna()
        assert optuna.logging.get_verbosity() == optuna.logging.WARNING
    finally:
        logger.setLevel(level)
        quiet_optuna()


def test_margins_over_baselines_without_the_bests_scores_are_empty_not_an_error() -> None:
    from automerge.study.export import margins_over_baselines

    scores = {"A": {"p0-i00-s0001": 1.0}, "trial 3": {"p0-i00-s0001": 2.0}}
    (margin,) = margins_over_baselines(scores, best="trial 3")
    assert margin[0] == "A" and margin[1] == 1.0
    assert margins_over_baselines(scores, best="trial 9") == []  # no scores of its own: nothing to compare


def test_the_baselines_of_a_search_that_is_not_weighted_sums_alpha_are_named_by_its_ends(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    """The label the progress, the report and the dashboard show for each baseline: pure A / pure B
    only for weighted_sum's alpha over [0, 1]; otherwise the value every dimension takes."""
    search = {"density": {"low": 0.2, "high": 0.9, "groups": {"ALL": ["IN00", "OUT11"]}}}
    space = build_space(
        load_study_file(_study(tmp_path, tiny_models, search=search)), SD1, METHODS.get("ties")
    )
    assert [(b.label, b.values) for b in space.baselines()] == [
        ("all 0.2", {"density.ALL": 0.2}),
        ("all 0.9", {"density.ALL": 0.9}),
        ("all mid", {"density.ALL": pytest.approx(0.55)}),
    ]


def test_a_compare_studys_best_is_the_unbeaten_candidate_preferred_over_the_most_others() -> None:
    from optuna_dashboard.preferential import PreferentialStudy

    study = optuna.create_study(direction="maximize")
    for _ in range(4):
        study.ask()
    assert records.preferred_trial(study) is None  # no choice yet
    trials = study.trials
    PreferentialStudy(study).report_preference(trials[1], trials[0])
    PreferentialStudy(study).report_preference(trials[2], [trials[0], trials[3]])
    # unbeaten: 1 (one win) and 2 (two wins); the lower number only breaks a tie
    assert records.preferred_trial(study).number == 2
    PreferentialStudy(study).report_preference(trials[1], trials[3])
    assert records.preferred_trial(study).number == 1  # two wins each: the one judged the longest


def test_the_front_is_of_completed_trials_and_a_weighted_pick_takes_one_weight_per_objective() -> None:
    from optuna.trial import TrialState, create_trial

    from automerge.study.pareto import PickRule

    study = optuna.create_study(directions=["maximize", "maximize"])
    for values in ((1.0, 0.0), (0.0, 1.0), (0.4, 0.4)):
        study.add_trial(create_trial(values=list(values)))
    study.add_trial(create_trial(state=TrialState.FAIL))
    study.ask()  # running: no scores yet
    assert [t.number for t in records.front_trials(study)] == [0, 1, 2]
    assert records.pick_trial(study, PickRule("weighted", (1.0, 0.0))).trial.number == 0
    assert records.pick_trial(study, PickRule("weighted", (0.0, 1.0))).trial.number == 1
    with pytest.raises(ConfigError, match=r"--pick weighted:1: 1 weight\(s\) for the 2 objectives"):
        records.pick_trial(study, PickRule("weighted", (1.0,)))
