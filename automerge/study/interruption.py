"""Ctrl-C and SIGTERM during a study, made safe for the storage.

Python raises KeyboardInterrupt wherever the main thread happens to be. Inside the objective (merge,
render, score: our code) that is what we want: the trial is failed "interrupted" at once. Inside
Optuna's own work (ask, tell, a storage transaction, the callbacks) it is not: the exception tears the
write, and Optuna's loop dies with an UnboundLocalError (exit 1, no export). There the signal is
remembered instead, and the study stops at the next safe point: the end of that trial (a callback) or
the start of the next objective call, whichever comes first. A second Ctrl-C outside the objective
raises at once, for a user who insists; SIGTERM never does (schedulers and `automerge optimize
--workers` may deliver it to a worker more than once).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType

import optuna
from optuna.trial import FrozenTrial

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interruption:
    """The signal handler for a study's loop: ``inside_objective()`` marks where raising is safe,
    ``__call__`` is an Optuna callback that stops the study after a deferred signal."""

    def __init__(self) -> None:
        self.requested = False  # a signal arrived; the study stops at the next safe point
        self._in_objective = False
        self._ctrl_c = False  # a first Ctrl-C (SIGINT) arrived

    def handle(self, signum: int, frame: FrameType | None) -> None:
        insisted = self._ctrl_c and signum == signal.SIGINT
        self._ctrl_c = self._ctrl_c or signum == signal.SIGINT
        self.requested = True
        if self._in_objective or insisted:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def inside_objective(self) -> Iterator[None]:
        """Where a signal raises KeyboardInterrupt at once; entered after a deferred signal, it raises."""
        if self.requested:
            raise KeyboardInterrupt
        self._in_objective = True
        try:
            yield
        finally:
            self._in_objective = False

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.requested:
            study.stop()

    @contextlib.contextmanager
    def installed(self) -> Iterator[Interruption]:
        """The handler on SIGINT and SIGTERM for the block, then the previous handlers back. Off the
        main thread (where Python refuses handlers) signals are left alone."""
        try:
            previous = {number: signal.signal(number, self.handle) for number in SIGNALS}
        except ValueError:  # not the main thread
            yield self
            return
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
