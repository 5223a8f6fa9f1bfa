"""Where a study lives: an Optuna storage named by URL, shared by every worker that runs the study.

- ``sqlite:///PATH.db`` (the default: ``<study file stem>.db`` beside the study file): one machine;
- ``postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB`` (any SQLAlchemy URL Optuna's RDB storage takes,
  with its driver installed): many machines;
- ``journal:PATH``: Optuna's journal file (append-only, file-locked) on a file system every worker
  mounts; relative paths count from the study file's folder.

RDB storages (SQLite, PostgreSQL) opened with a ``heartbeat`` (the study file's): a worker that dies
(SIGKILL, power loss) stops beating, and ``grace`` seconds later another worker marks its trial FAIL
and re-runs it once (Optuna's ``RetryHeartbeatStaleTrialCallback``). Optuna passes over a trial that
has no heartbeat yet (its worker died between taking it and its first beat); ``fail_trials_that_never_beat``
fails those too, once they are ``grace`` seconds old.
Optuna's journal storage has no heartbeat: a dead worker's trial stays RUNNING there.
"""

from __future__ import annotations

import datetime
import logging
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from sqlalchemy import event
from sqlalchemy.exc import SQLAlchemyError

from automerge.errors import StudyError
from automerge.study import records
from automerge.study.config import StudyFile, default_storage

if TYPE_CHECKING:
    from automerge.study.config import HeartbeatConfig

JOURNAL = "journal:"
RDB_SCHEMES = ("sqlite", "postgresql", "mysql")
SQLITE_LOCK_TIMEOUT_S = 120
CREATE_ATTEMPTS = 6  # workers creating a fresh SQLite file or database at the same instant race on its tables


def storage_url(configured: str | None, *, study_path: Path) -> str:
    """The study's storage URL: ``configured`` (``storage:`` or ``--storage``), else SQLite beside
    the study file; a journal path made absolute against the study file's folder."""
    if not configured:
        return f"sqlite:///{study_path.with_suffix('.db')}"
    if configured.startswith(JOURNAL):
        path = Path(configured.removeprefix(JOURNAL).removeprefix("//")).expanduser()
        if not str(path) or str(path) == ".":
            raise StudyError(f"{study_path}: storage: '{configured}' names no file; use journal:PATH")
        return JOURNAL + str(path if path.is_absolute() else study_path.parent / path)
    scheme = configured.split(":", 1)[0].split("+", 1)[0]
    if "://" not in configured or scheme not in RDB_SCHEMES:
        raise StudyError(
            f"{study_path}: storage: '{configured}' is not a storage URL; use sqlite:///PATH.db, "
            "postgresql+psycopg://USER@HOST/DB or journal:PATH"
        )
    return configured


def open_storage(url: str, *, heartbeat: HeartbeatConfig | None = None) -> optuna.storages.BaseStorage:
    """The Optuna storage behind ``url`` (from ``storage_url``); RDB storages with ``heartbeat``."""
    if url.startswith(JOURNAL):
        path = Path(url.removeprefix(JOURNAL))
        if not path.parent.is_dir():
            raise StudyError(
                f"storage: {url}: folder {path.parent} does not exist; create it or fix the path"
            )
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    options: dict[str, object] = {}
    if heartbeat is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
        options = {
            "heartbeat_interval": heartbeat.interval,
            "grace_period": heartbeat.grace,
            "heartbeat_stale_trial_callback": retry,
        }
    if url.startswith("sqlite"):  # workers on one file wait for its lock instead of failing after 5 s
        options["engine_kwargs"] = {"connect_args": {"timeout": SQLITE_LOCK_TIMEOUT_S}}
    for attempt in range(CREATE_ATTEMPTS):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.8
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(url, **options)
            if url.startswith("sqlite"):
                _serialize_sqlite(storage.engine)
            return storage
        except ImportError:
            scheme = url.split(":", 1)[0]
            raise StudyError(
                f"storage: {_redacted(url)} needs a database driver for '{scheme}' that is not installed; "
                "install it (PostgreSQL: pip install 'automerge[postgres]'), or use sqlite:///PATH.db or journal:PATH"
            ) from None
        except SQLAlchemyError as error:
            if attempt + 1 < CREATE_ATTEMPTS and _is_race(error):
                time.sleep(0.2 * (attempt + 1))
                continue
            raise StudyError(
                f"storage: cannot open {_redacted(url)}: {type(error).__name__}: {_first_line(error)}"
            ) from None
    raise AssertionError("unreachable")


def fail_trials_that_never_beat(
    study: optuna.Study, heartbeat: HeartbeatConfig, *, now: datetime.datetime | None = None
) -> list[int]:
    """Fail (and queue once more, as Optuna's stale-trial callback does) the RUNNING trials that
    started over ``heartbeat.grace`` seconds before ``now`` and never recorded a heartbeat: their
    worker died before its first beat, and Optuna's own check only sees trials with a heartbeat row.
    Returns the failed trials' numbers; a no-op on storages without heartbeats."""
    storage = study._storage
    rdb = getattr(storage, "_backend", storage)  # Optuna wraps an RDB storage in its trial cache
    if not isinstance(rdb, optuna.storages.RDBStorage) or rdb.heartbeat_interval is None:
        return []
    from optuna.storages._rdb import models  # Optuna's heartbeat table, as its own stale check reads it

    now = now or datetime.datetime.now()
    grace = datetime.timedelta(seconds=heartbeat.grace)
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    old = [t for t in running if t.datetime_start is not None and now - t.datetime_start > grace]
    if not old:
        return []
    session = rdb.scoped_session()
    try:
        beating = {
            trial_id
            for (trial_id,) in session.query(models.TrialHeartbeatModel.trial_id).filter(
                models.TrialHeartbeatModel.trial_id.in_([t._trial_id for t in old])
            )
        }
    finally:
        session.close()
    retry = rdb.get_failed_trial_callback()
    failed = []
    for trial in old:
        if trial._trial_id in beating:
            continue
        try:
            if not storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # finished meanwhile (another worker got there first)
        failed.append(trial.number)
        if retry is not None:
            retry(study, storage.get_trial(trial._trial_id))
    return failed


def _serialize_sqlite(engine: Any) -> None:
    """Every transaction on the SQLite file takes its write lock at BEGIN (SQLAlchemy's recipe for
    pysqlite): SQLite has no SELECT … FOR UPDATE, so without it two workers could both move the same
    queued trial from WAITING to RUNNING and run it twice."""

    @event.listens_for(engine, "connect")
    def _no_implicit_transactions(connection: Any, record: Any) -> None:
        connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the hooks are not reused


def _is_race(error: Exception) -> bool:
    """A fresh database's schema created by two workers at once (SQLite, PostgreSQL), or a SQLite file
    locked meanwhile."""
    text = str(error)
    return any(
        sign in text
        for sign in (
            "UNIQUE constraint failed",
            "database is locked",
            "already exists",
            "duplicate key value",
        )
    )


def _first_line(error: Exception) -> str:
    """SQLAlchemy's message without the SQL statement and background link it appends."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _redacted(url: str) -> str:
    """The URL without its password: ``scheme://user:***@host/…`` (the host follows the last @ before
    the path, so a password with an unencoded @ is hidden whole)."""
    head, sep, tail = url.partition("://")
    authority, slash, path = tail.partition("/")
    if not sep or "@" not in authority:
        return url
    credentials, at, host = authority.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{head}://{user}:***{at}{host}{slash}{path}" if ":" in credentials else url


def storage_exists(url: str) -> bool:
    """False when the storage is a file (SQLite, journal) not written yet: nothing to load from it,
    and opening it would create it. Database servers always count as existing."""
    for prefix in ("sqlite:///", JOURNAL):
        if url.startswith(prefix):
            return Path(url.removeprefix(prefix)).exists()
    return True


def quiet_optuna() -> None:
    """Optuna's own log lines (study created, each trial finished, a failed trial's traceback) only
    with ``--debug`` (the ``automerge`` logger at DEBUG): the progress display says it all in one line."""
    debug = logging.getLogger("automerge").isEnabledFor(logging.DEBUG)
    optuna.logging.set_verbosity(optuna.logging.WARNING if debug else optuna.logging.ERROR)


def find_study(study: StudyFile) -> optuna.Study | None:
    """The study as stored, or None when its storage holds none (nothing is created); a changed
    search problem is refused."""
    url = default_storage(study)
    quiet_optuna()
    if not storage_exists(url):
        return None
    try:
        existing = optuna.load_study(
            study_name=study.name, storage=open_storage(url, heartbeat=study.heartbeat)
        )
    except KeyError:
        return None
    stored = existing.user_attrs.get(records.FINGERPRINT)
    if stored is not None and stored != study.search_fingerprint():
        raise StudyError(
            f"{study.path}: study '{study.name}' in {url} was made from a different search problem "
            "(models, method, search, params, payloads or reward changed); give the study a new name, "
            "or delete its storage to start over. Changing trials, timeout, early_stopping or export is fine."
        )
    _check_contents(study, existing, url)
    return existing


def _check_contents(study: StudyFile, existing: optuna.Study, url: str) -> None:
    """Refuse a study whose payload or reward files changed since it started (contents, not paths)."""
    stored = existing.user_attrs.get(records.FINGERPRINTS)
    if not isinstance(stored, dict):
        return  # made before contents were fingerprinted: recorded on this run, checked from the next
    now = study.content_fingerprints()
    changed = [name for name in sorted(now) if stored.get(name) != now[name]]
    if not changed:
        return
    files = []
    if "payloads" in changed:
        files += [str(path) for path in study.payloads]
    if "reward" in changed and isinstance(study.reward, Path):
        files.append(str(study.reward))
    if "objectives" in changed:
        files += [str(o.reward) for o in study.objectives or () if isinstance(o.reward, Path)]
    shown = f" ({', '.join(files)})" if files else ""
    raise StudyError(
        f"{study.path}: {', '.join(changed)} changed since study '{study.name}' started in {url}{shown}; "
        f"give the study a new name (name: {study.name}-2) to start a new study with them, or undo the "
        "change to resume"
    )
