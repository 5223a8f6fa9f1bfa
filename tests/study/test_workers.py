"""Several workers on one study (issue 13): separate processes started at the same instant on one
study file, as a user with several GPUs does. Exactly the budget, no point twice, the baselines
once, every complete trial with its images; on SQLite and on Optuna's journal file."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from _postgres import postgres_server, server_binaries

from automerge.study import find_study, load_study_file, records
from automerge.study.storage import open_storage, storage_url

WORKER = "import sys; from automerge.cli import main; sys.argv = ['automerge', *sys.argv[1:]]; main()"
STUCK_WORKER = (  # a worker whose trials never end (a hung GPU): killed mid-trial whatever the render speed
    "import threading; from automerge.study import StudyRuntime; "
    "StudyRuntime.evaluate = lambda self, *args, **kwargs: threading.Event().wait(); " + WORKER
)


def _start_workers(study: Path, count: int, *, code: str = WORKER) -> list[subprocess.Popen[str]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [
        subprocess.Popen(
            [sys.executable, "-c", code, "optimize", str(study)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(count)
    ]


def _optimize_with_workers(study: Path, workers: int) -> subprocess.CompletedProcess[str]:
    """``automerge optimize STUDY --workers N`` as a user runs it, one torch thread per worker."""
    return subprocess.run(
        [sys.executable, "-m", "automerge", "optimize", str(study), "--workers", str(workers)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


@pytest.fixture(params=["sqlite", "journal", "postgresql"])
def storage(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The study file's ``storage:``: the default SQLite file, a journal file beside the study, or a
    real PostgreSQL server on a loopback port (``_postgres.py``; on CI a missing server fails)."""
    if request.param == "sqlite":
        yield None
    elif request.param == "journal":
        yield "journal:study.journal"
    else:
        binaries, why = server_binaries()
        if binaries is None:
            if os.environ.get("CI"):
                pytest.fail(f"no PostgreSQL server for the multi-worker test: {why}")
            pytest.skip(why)
        with postgres_server(binaries) as url:
            yield url


@pytest.mark.slow
def test_three_workers_run_exactly_the_budget_with_distinct_points_the_baselines_once_and_one_export(
    make_study, storage: str | None
) -> None:
    """Three workers on SQLite (the default); two on the journal file and on PostgreSQL, which still
    race for the budget's last places and the baselines (fewer processes keep the suite's time)."""
    workers, trials = (3, 6) if storage is None else (2, 4)  # 3 baselines, then searched points
    path = make_study(trials=trials, baselines=True, storage=storage, sampler={"name": "random", "seed": 0})
    done = _optimize_with_workers(path, workers)
    logs = "\n".join((path.parent / f"study-worker{i}.log").read_text()[-1500:] for i in range(workers))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + logs

    study = find_study(load_study_file(path))
    assert study is not None
    finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(finished) == trials  # no worker renders a trial past the budget
    # Two workers asking at the same instant for the last place: the later one's trial is not run and
    # stays as a failure that says so (before, it ran: 30 trials became 31 or 32). BudgetTaken keeps
    # workers from asking once the places are held, so this is rare.
    others = [t for t in study.trials if t.state != optuna.trial.TrialState.COMPLETE]
    assert all(
        t.state == optuna.trial.TrialState.FAIL
        and t.user_attrs.get(records.FAIL_REASON) == records.OVER_BUDGET
        and not t.params
        for t in others
    ), [(t.number, t.state, t.user_attrs) for t in others]
    assert len(others) <= 2
    points = {tuple(sorted(trial.params.items())) for trial in finished}
    assert len(points) == trials  # before: workers seeded alike proposed the same points
    baselines = [trial.user_attrs.get("baseline") for trial in finished if trial.user_attrs.get("baseline")]
    assert sorted(baselines) == ["A", "B", "uniform 0.5"]
    assert all(trial.user_attrs.get("images") for trial in finished)
    # `optimize --workers N` starts the workers and exports once, itself: no worker exports
    assert all(f"worker {i} on the study's device" in done.stdout for i in range(workers)), done.stdout
    assert not any("exported" in (path.parent / f"study-worker{i}.log").read_text() for i in range(workers))
    assert done.stdout.count("exported trial") == 1
    assert (path.parent / "out" / "test-study" / "model.safetensors").is_file()


def test_storage_urls_are_checked_and_journal_paths_count_from_the_study_folder(tmp_path: Path) -> None:
    from automerge.errors import StudyError

    study = tmp_path / "s.yaml"
    assert storage_url(None, study_path=study) == f"sqlite:///{tmp_path / 's.db'}"
    assert storage_url("journal:runs/s.log", study_path=study) == f"journal:{tmp_path / 'runs/s.log'}"
    assert storage_url("postgresql+psycopg://u@h/db", study_path=study) == "postgresql+psycopg://u@h/db"
    for bad in ("studies/s.db", "redis://h/0", "journal:"):
        with pytest.raises(StudyError, match="storage"):
            storage_url(bad, study_path=study)


@pytest.mark.slow
def test_a_killed_workers_trial_is_failed_by_its_heartbeat_and_run_again(make_study, tmp_path: Path) -> None:
    import contextlib
    import signal
    import sqlite3
    import time

    path = make_study(trials=2, baselines=False, heartbeat={"interval": 1, "grace": 4})
    url = storage_url(None, study_path=path)
    (first,) = _start_workers(path, 1, code=STUCK_WORKER)  # its first trial never ends: killed in it
    deadline, running = time.monotonic() + 300, []
    while not running and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.1)
        if path.with_suffix(".db").exists():
            try:  # the product's storage opening: it retries while the worker is creating the schema
                study = optuna.load_study(study_name="test-study", storage=open_storage(url))
            except KeyError:
                continue
            # a trial with all its dimensions proposed (not caught between two suggest calls: CI did)
            running = [
                t for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)) if len(t.params) == 2
            ]
    if not running:  # say why: the worker's exit code and last output, or that it was still running
        first.kill()
        output = first.communicate()[0]  # killed: it ends
        raise AssertionError(f"the worker never started a trial (exit {first.returncode}): {output[-3000:]}")
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    killed = running[0].number
    beats = open_storage(
        url, heartbeat=load_study_file(path).heartbeat
    )  # Optuna's stale check, as workers run it
    study_id = beats.get_study_id_from_name("test-study")
    # the grace period passing, without waiting for it: the killed worker's last beat moved an hour back
    with contextlib.closing(sqlite3.connect(path.with_suffix(".db"))) as database, database:
        moved = database.execute(
            "UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, '-1 hour') WHERE trial_id = ?",
            (running[0]._trial_id,),
        ).rowcount
    assert moved == 1  # the killed worker had beaten
    assert running[0]._trial_id in beats._get_stale_trial_ids(study_id)  # stale in Optuna's own check

    (second,) = _start_workers(path, 1)
    output = second.communicate(timeout=600)[0]
    assert second.returncode == 0, output[-2000:]
    study = find_study(load_study_file(path))
    states = {trial.number: trial.state for trial in study.trials}
    assert states[killed] == optuna.trial.TrialState.FAIL
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retried) == 1 and retried[0].state == optuna.trial.TrialState.COMPLETE
    assert retried[0].params == running[0].params  # the same point, run again
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 2


def test_gpus_and_workers_are_checked_before_anything_starts(make_study, capsys) -> None:
    from cli_helpers import run_cli

    path = make_study()
    for args, message in (
        (["--gpus", "0,x"], "not a list of distinct GPU indices"),
        (["--gpus", "0,0"], "not a list of distinct GPU indices"),
        (["--gpus", "0", "--workers", "2"], "without --workers"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--storage", "nowhere/s.db"], "is not a storage URL"),
    ):
        result = run_cli(capsys, "optimize", path, *args)
        assert result.code == 2 and message in result.err, (args, result.err)
    assert not path.with_suffix(".db").exists()


MARK = "=== now with --debug ==="
FLAKY = f"""
import sys
from automerge.errors import RenderError
from automerge.study import StudyRuntime
from automerge.cli import main
real, calls = StudyRuntime.evaluate, []
def flaky(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        raise RenderError("black image for job p0")
    return real(self, *args, **kwargs)
StudyRuntime.evaluate = flaky
quiet, debug = sys.argv[1:]
for args in (["optimize", quiet, "--no-export"], ["--debug", "optimize", debug, "--no-export"]):
    calls.clear()
    sys.argv = ["automerge", *args]
    try:
        main()
    except SystemExit as stop:
        if stop.code:
            raise
    if args[0] != "--debug":
        print("{MARK}", flush=True)
        print("{MARK}", file=sys.stderr, flush=True)
"""


@pytest.mark.slow
def test_a_failed_trial_is_one_line_and_its_traceback_only_with_debug(make_study, tmp_path: Path) -> None:
    """Optuna logged every failed trial with its traceback, and 'study created'/'trial finished' lines.
    One process runs the CLI twice (without, then with --debug) on two studies: one start, not two."""
    quiet = make_study(trials=3, baselines=False)
    debug = quiet.with_name("debug.yaml")
    debug.write_text(quiet.read_text().replace("name: test", "name: test-debug"))
    done = subprocess.run(
        [sys.executable, "-c", FLAKY, str(quiet), str(debug)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    (out_quiet, out_debug), (err_quiet, err_debug) = (text.split(MARK) for text in (done.stdout, done.stderr))
    plain, verbose = out_quiet + err_quiet, out_debug + err_debug
    assert "Traceback" not in plain and "Traceback" in verbose
    assert plain.count("black image for job p0") == 1, plain
    assert "[I " not in plain and "[W " not in plain and "Warning" not in plain, plain


def test_a_worker_stops_asking_once_every_place_of_the_budget_is_held() -> None:
    """Before: a worker asked for one more trial while another worker ran the last one, and that trial
    stayed in the study as an over-budget failure (26 trials for a budget of 24)."""
    from automerge.study.stopping import BudgetTaken

    study = optuna.create_study()
    for value in (1.0, 2.0):
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=value))
    other_worker = study.ask()  # another worker's running trial holds the third place
    stops: list[int] = []
    study.stop = lambda: stops.append(len(study.trials))  # type: ignore[method-assign]
    stop = BudgetTaken(3)
    stop(study, study.trials[1])
    assert stops == [3]
    study.tell(other_worker, state=optuna.trial.TrialState.FAIL)  # it died; its place is free again
    stop(study, study.trials[1])
    study.enqueue_trial({})
    study.enqueue_trial({})  # a queued trial takes the free place
    stop(study, study.trials[1])
    assert stops == [3]
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=3.0))
    stop(study, study.trials[1])  # every place held: the other queued trial stays queued, not refused
    assert stops == [3, 6]


def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_failed_and_run_again(tmp_path: Path) -> None:
    """Optuna only fails RUNNING trials that have a heartbeat row; a worker killed between taking a trial
    and its first beat would leave it RUNNING, holding a place in the budget forever."""
    import datetime

    from automerge.study.config import HeartbeatConfig
    from automerge.study.storage import fail_trials_that_never_beat

    heartbeat = HeartbeatConfig(interval=1, grace=6)
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat=heartbeat)
    study = optuna.create_study(study_name="s", storage=storage)
    silent = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    beating = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    storage.record_heartbeat(beating._trial_id)  # Optuna's own stale check owns this one
    finished = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    study.tell(finished, 0.5)  # finished before its first beat was due: not a dead worker's trial
    started = study.trials[silent.number].datetime_start

    assert fail_trials_that_never_beat(study, heartbeat, now=started + datetime.timedelta(seconds=5)) == []
    assert study.trials[silent.number].state == optuna.trial.TrialState.RUNNING

    later = started + datetime.timedelta(seconds=60)
    assert fail_trials_that_never_beat(study, heartbeat, now=later) == [silent.number]
    states = {trial.number: trial.state for trial in study.trials}
    assert states[silent.number] == optuna.trial.TrialState.FAIL
    assert states[beating.number] == optuna.trial.TrialState.RUNNING
    assert states[finished.number] == optuna.trial.TrialState.COMPLETE
    (retry,) = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert (
        retry.system_attrs["failed_trial"] == silent.number
        and retry.params == study.trials[silent.number].params
    )
    assert fail_trials_that_never_beat(study, heartbeat, now=later) == []  # once


def test_storage_errors_never_print_the_database_password() -> None:
    from automerge.study.storage import _redacted

    assert _redacted("postgresql+psycopg://ann:s3cret@db.lan:5432/studies") == (
        "postgresql+psycopg://ann:***@db.lan:5432/studies"
    )
    # an unencoded @ in the password: the host follows the last @, so all of the password is hidden
    assert _redacted("postgresql://ann:p@ss:w@rd@db/x") == "postgresql://ann:***@db/x"
    assert _redacted("postgresql://ann@db/x") == "postgresql://ann@db/x"  # no password: as given
    assert _redacted("postgresql://ann:pw@db/x?options=a@b") == "postgresql://ann:***@db/x?options=a@b"
    assert _redacted("sqlite:////data/a@b.db") == "sqlite:////data/a@b.db"
    assert _redacted("not a url with : and @") == "not a url with : and @"


def test_a_schema_race_is_told_from_a_real_storage_error() -> None:
    from automerge.study.storage import _first_line, _is_race

    for race in (
        "(sqlite3.IntegrityError) UNIQUE constraint failed: studies.study_name",
        "(sqlite3.OperationalError) database is locked",
        "(sqlite3.OperationalError) table studies already exists",
        '(psycopg.errors.UniqueViolation) duplicate key value violates unique constraint "alembic_version_pkc"',
    ):
        assert _is_race(Exception(race)), race
    for error in (
        "(sqlite3.OperationalError) unable to open database file",
        "password authentication failed",
    ):
        assert not _is_race(Exception(error)), error
    assert _first_line(
        Exception("(psycopg) connection refused\n[SQL: SELECT 1]\n(Background: https://sqlalche.me)")
    ) == ("(psycopg) connection refused")
    assert _first_line(Exception("")) == "Exception"


def test_a_journal_in_a_missing_folder_is_refused_and_one_in_a_folder_opens(tmp_path: Path) -> None:
    from automerge.errors import StudyError

    missing = f"journal:{tmp_path / 'nowhere' / 's.journal'}"
    with pytest.raises(StudyError) as refused:
        open_storage(missing)
    assert str(refused.value) == (
        f"storage: {missing}: folder {tmp_path / 'nowhere'} does not exist; create it or fix the path"
    )
    assert isinstance(open_storage(f"journal:{tmp_path / 's.journal'}"), optuna.storages.JournalStorage)


def test_a_storage_that_keeps_racing_is_tried_six_times_then_refused_without_its_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Workers creating one fresh database race on its tables: each try waits a little longer, and the
    last race is an error naming the storage (its password hidden), not a silent give-up."""
    import sqlalchemy.exc

    from automerge.errors import StudyError
    from automerge.study import storage as storage_module

    tries: list[str] = []
    pauses: list[float] = []

    def racing(url: str, **options: object) -> None:
        tries.append(url)
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("database is locked"))

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    monkeypatch.setattr(storage_module.time, "sleep", pauses.append)
    url = "postgresql+psycopg://ann:s3cret@db.lan/studies"
    with pytest.raises(StudyError) as refused:
        open_storage(url)
    assert tries == [url] * storage_module.CREATE_ATTEMPTS == [url] * 6
    assert pauses == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # none after the last try
    assert str(refused.value) == (
        "storage: cannot open postgresql+psycopg://ann:***@db.lan/studies: OperationalError: "
        "(builtins.Exception) database is locked"
    )


def test_sigterm_to_the_parent_of_workers_reaches_every_worker(tmp_path, monkeypatch) -> None:
    """`kill <pid of automerge optimize --workers N>` (not the whole group) left the workers running
    as orphans; the parent now forwards SIGTERM to each live worker and keeps waiting for them."""
    import os
    import signal
    import subprocess

    from rich.console import Console

    from automerge.commands import launch_workers

    started: list[FakeWorker] = []

    class FakeWorker:
        def __init__(self, args, env, stdout, stderr) -> None:
            self.signals: list[int] = []
            self.waits = 0
            started.append(self)

        def poll(self) -> int | None:
            return 130 if self.signals else None

        def send_signal(self, signum: int) -> None:
            self.signals.append(signum)

        def wait(self) -> int:
            self.waits += 1
            if self is started[0] and self.waits == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # the scheduler signals the parent only
            return 130 if self.signals else 0

    monkeypatch.setattr(subprocess, "Popen", FakeWorker)
    before = signal.getsignal(signal.SIGTERM)
    codes = launch_workers(
        tmp_path / "study.yaml", devices=[None, None], worker_args=[], console=Console(quiet=True)
    )
    assert [worker.signals for worker in started] == [[signal.SIGTERM], [signal.SIGTERM]]
    assert codes == [130, 130]
    assert signal.getsignal(signal.SIGTERM) == before  # the parent's handler put back
