"""Ctrl-C/SIGTERM handling: raise inside the objective, defer everywhere else."""

from __future__ import annotations

import signal
import threading

import optuna
import pytest

from automerge.study.interruption import Interruption


def test_a_signal_outside_the_objective_is_deferred_and_stops_the_study_after_the_trial() -> None:
    interruption = Interruption()
    interruption.handle(signal.SIGTERM, None)  # no raise: Optuna may be mid-write
    assert interruption.requested
    study = optuna.create_study()
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=5, callbacks=[interruption])
    assert len(study.trials) == 1  # the callback stopped it after the first trial


def test_a_signal_inside_the_objective_raises_at_once() -> None:
    interruption = Interruption()
    with pytest.raises(KeyboardInterrupt), interruption.inside_objective():
        interruption.handle(signal.SIGINT, None)
    interruption_after = Interruption()
    with interruption_after.inside_objective():
        pass
    interruption_after.handle(signal.SIGINT, None)  # outside again: deferred
    assert interruption_after.requested


def test_the_next_objective_call_after_a_deferred_signal_raises_before_any_work() -> None:
    interruption = Interruption()
    interruption.handle(signal.SIGTERM, None)
    work = []
    with pytest.raises(KeyboardInterrupt), interruption.inside_objective():
        work.append("merge")
    assert work == []


def test_a_second_ctrl_c_outside_the_objective_raises_for_a_user_who_insists() -> None:
    interruption = Interruption()
    interruption.handle(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        interruption.handle(signal.SIGINT, None)


def test_a_repeated_sigterm_stays_deferred() -> None:
    """A scheduler signalling the whole process group while the parent forwards to its workers
    delivers SIGTERM twice: that must not tear a storage write."""
    interruption = Interruption()
    interruption.handle(signal.SIGTERM, None)
    interruption.handle(signal.SIGTERM, None)
    interruption.handle(signal.SIGINT, None)  # a first Ctrl-C, after them
    assert interruption.requested
    with pytest.raises(KeyboardInterrupt):
        interruption.handle(signal.SIGINT, None)  # the second insists


def test_installed_replaces_both_handlers_and_puts_them_back() -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with Interruption().installed() as interruption:
        assert signal.getsignal(signal.SIGINT) == interruption.handle
        assert signal.getsignal(signal.SIGTERM) == interruption.handle
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_off_the_main_thread_signals_are_left_alone() -> None:
    seen = []

    def worker() -> None:
        with Interruption().installed():
            seen.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [before]
