"""The terminal during a run: at 80 columns the live line keeps trial n/N, best, ETA and the stage;
each trial's line shows that trial's own stage times and no source location; the start-up phases
are named as they run."""

from __future__ import annotations

import io

from PIL import Image
from rich.console import Console

from automerge.study.progress import TrialProgress
from automerge.study.runtime import Evaluation
from automerge.terminal import startup_status


def _console(width: int = 80) -> Console:
    return Console(file=io.StringIO(), width=width, force_terminal=False, color_system=None)


def _evaluation(value: float, render: float) -> Evaluation:
    timings = {"sampler": 0.04, "merge": 0.012, "render": render, "score": 0.005, "bookkeeping": 0.02}
    return Evaluation(value, [value], {}, {"k": Image.new("RGB", (2, 2))}, timings)


def test_the_live_line_fits_80_columns_with_count_best_eta_and_stage() -> None:
    """At 80 columns the bar lost its count and ETA ("t… last …")."""
    console = _console()
    progress = TrialProgress(console, total=200, start_best=None)
    with progress:
        for number in range(12):
            progress.update(number, _evaluation(-1.2345678e-06 * (20 - number), render=0.31))
            progress._progress.advance(progress._task)
        progress.stage("render")
        line = _console()
        line.print(progress.renderable())
        shown = line.file.getvalue()
    assert len(shown.strip().splitlines()) == 1, shown
    assert "12/200" in shown and "best -1.111e-05" in shown and "ETA" in shown and "render" in shown


def test_each_trial_line_shows_its_own_stage_times_and_no_source_location() -> None:
    """The per-trial line showed running medians and ended in "progress.py:63"."""
    console = _console()
    progress = TrialProgress(console, total=3, start_best=None)
    with progress:
        progress.update(0, _evaluation(-2.0, render=0.100))
        progress.update(1, _evaluation(-1.0, render=0.900))
        progress.update(2, _evaluation(-3.0, render=0.300))
    lines = [line for line in console.file.getvalue().splitlines() if line.startswith("trial ")]
    assert lines[:3] == [
        "trial 0: -2 (best)  ask 40 merge 12 render 100 score 5 save 20 ms",
        "trial 1: -1 (best)  ask 40 merge 12 render 900 score 5 save 20 ms",
        "trial 2: -3  ask 40 merge 12 render 300 score 5 save 20 ms",
    ]
    assert ".py:" not in console.file.getvalue()
    assert all(len(line) <= 80 for line in console.file.getvalue().splitlines())


def test_start_up_phases_are_named_with_their_durations() -> None:
    """The first 20–25 s of a study were silent."""
    console = _console()
    with startup_status(console) as status:
        status("loading 2 source models onto cpu")
        status("rendering the hidden target's 6 reference images")
    shown = console.file.getvalue().splitlines()
    assert shown[0].startswith("loading 2 source models onto cpu (") and shown[0].endswith(" s)")
    assert shown[1].startswith("rendering the hidden target's 6 reference images (")


def test_durations_read_as_words_at_every_scale() -> None:
    from automerge.terminal import duration_text

    assert [duration_text(s) for s in (0.42, 9.4, 42.4, 59.4, 187, 3599.4, 7500, 90061)] == [
        "0.4 s",
        "9.4 s",
        "42 s",
        "59 s",
        "3 min 07 s",
        "59 min 59 s",
        "2 h 05 min",
        "25 h 01 min",
    ]


def test_the_end_of_a_run_says_its_length_where_the_report_is_and_how_close_the_secret_is(
    make_study, tmp_path
) -> None:
    """Issue 14: the last lines of `optimize` give the total time, report.html's path and, for a
    hidden-target study, the recovered vs secret weights (the numbers the report's table holds)."""
    import re

    from automerge.study import load_study_file, run_study

    out = tmp_path / "out"
    path = make_study(trials=4, export={"dir": str(out)})
    console = Console(file=io.StringIO(), width=200)
    summary = run_study(load_study_file(path), console=console)
    text = console.file.getvalue()
    assert f"report: {out / 'report.html'}" in text and (out / "report.html").exists()
    # the run's length is said (its wording is duration_text's, tested above without a clock)
    assert "ran 4 trials in " in text
    line = re.search(
        r"recovered vs secret: mean \|error\| ([\d.]+) over 2 dimensions, worst (\S+) ([\d.]+) for ([\d.]+)",
        text,
    )
    assert line, text
    report = (out / "report.html").read_text()
    assert f"<b>{line.group(1)}</b>" in report  # the report's mean error, to the digit
    secret = {"alpha.TEXT": 0.8, "alpha.UNET": 0.3}  # the fixture's target: BASE 0.8, the rest 0.3
    assert float(line.group(4)) == secret[line.group(2)]
    assert summary.ran == 4


def test_with_two_objectives_the_live_line_shows_the_front_and_its_hypervolume() -> None:
    """Several objectives (issue 18): no "best"; the front's size and hypervolume, and each trial's
    scores with "(front)" when no earlier trial dominates it."""
    import optuna

    study = optuna.create_study(directions=["maximize", "maximize"])
    for number, values in enumerate([(0.0, 1.0), (1.0, 0.0), (0.5, 0.5)]):
        study.add_trial(optuna.trial.create_trial(values=list(values), user_attrs={"baseline": f"b{number}"}))
    console = _console()
    progress = TrialProgress(console, total=20, start_best=None, objectives=["near-a", "near-b"])
    progress.show_front(study)
    with progress:
        for number, values in ((3, (0.6, 0.6)), (4, (0.2, 0.2))):
            evaluation = _evaluation(values[0], render=0.2)
            evaluation.objective_scores = {"near-a": values[0], "near-b": values[1]}
            progress.update(number, evaluation)
            study.add_trial(optuna.trial.create_trial(values=list(values)))
            progress.callback(study, study.trials[-1])
        line = _console()
        line.print(progress.renderable())
        shown = line.file.getvalue()
    lines = [line for line in console.file.getvalue().splitlines() if line.startswith("trial ")]
    assert lines[0].startswith("trial 3: near-a 0.6, near-b 0.6 (front)  ask 40")
    assert lines[1].startswith("trial 4: near-a 0.2, near-b 0.2  ask 40")
    assert "2/20" in shown and "front 3 HV 0.36" in shown and "best" not in shown
