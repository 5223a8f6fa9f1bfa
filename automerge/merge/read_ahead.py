"""The export's sources read ahead of the merge, in a background thread.

A merge that first touches a source's bytes in its own threads waits for the disk there, key after
key, and the disk idles while it computes: a TIES export of 10 real-size SD1 sources took 47–50 s
from the disk against ~20 s for reading them once. A thread that reads the next keys of every source
keeps the disk busy while the merge computes: 26–34 s in alternated runs (BENCHMARKS.md). The pages
are the files' page cache, not anonymous memory, and at most ``READ_AHEAD_BYTES`` are read ahead of
the key being merged.

A window of keys is read in two steps: every source's bytes of the window ``request``ed (reads
queued, exactly those bytes), then each one's ``read_ahead`` (waits for them, maps them). Touching
pages not yet read makes the system read around each touch (8 MiB a file on this project's VM): the
first keys of 100 tiny SDXL sources brought in ~70 % of all their bytes before the first key could
merge. The merge asks ``ready(key)`` before it reads a key, so it never touches a page the thread has
not read yet, and the windows arrive in the merge's order.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from functools import partial

from automerge.checkpoints import Checkpoint
from automerge.errors import CheckpointError

READ_AHEAD_BYTES = 2 << 30
"""Bytes of the sources read ahead of the key being merged, at most."""
WINDOW_BYTES = 64 << 20
"""Bytes asked of the sources at a time (adjacent keys of one source in one call)."""


def read_bytes(key: str, checkpoints: Sequence[Checkpoint]) -> int:
    """Bytes of ``key`` read from ``checkpoints``: its size in the first, once per checkpoint."""
    return checkpoints[0].info(key).nbytes * len(checkpoints) if checkpoints else 0


class ReadAhead:
    """Reads ``reads`` (key, the checkpoints the merge of the key reads: one sequence object for keys
    read from the same ones) in order, window after window, at most ``budget`` bytes (a key's size in
    its first checkpoint times their number) ahead of the merge; ``ready(key)`` before the merge reads
    a key (it waits for the key's window), ``passed(key)`` after each key is merged, ``close()`` at the
    end (or use it as a context manager). Advisory: when a read fails, the thread stops, ``ready``
    returns at once and the merge reads the bytes itself."""

    def __init__(
        self, reads: Sequence[tuple[str, Sequence[Checkpoint]]], *, budget: int = READ_AHEAD_BYTES
    ) -> None:
        self._reads = reads
        sizes = [read_bytes(key, checkpoints) for key, checkpoints in reads]
        self._ends = list(itertools.accumulate(sizes))  # bytes through each key
        self._position = {key: i for i, (key, _) in enumerate(self._reads)}
        self._budget = budget
        self._merged = 0  # bytes through the last key the merge passed
        self._read = 0  # keys read: reads[:_read]
        self._wanted = -1  # the last key the merge waits for: its window is read whatever the budget
        self._stopped = self._ended = False
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="automerge-read-ahead", daemon=True)
        self._thread.start()

    def passed(self, key: str) -> None:
        """The merge is done with ``key`` (and the keys before it)."""
        index = self._position.get(key)
        if index is not None:
            with self._condition:
                self._merged = max(self._merged, self._ends[index])
                self._condition.notify_all()

    def ready(self, key: str) -> None:
        """Returns once ``key``'s window is read (at once for a key not in ``reads``, or when the
        thread has ended)."""
        index = self._position.get(key)
        if index is None:
            return
        with self._condition:
            if index >= self._read and not self._ended:
                self._wanted = max(self._wanted, index)
                self._condition.notify_all()
                self._condition.wait_for(lambda: index < self._read or self._ended)

    def close(self) -> None:
        with self._condition:
            self._stopped = True
            self._condition.notify()
        self._thread.join()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self) -> None:
        try:
            start = 0
            while start < len(self._reads):
                stop = self._window_end(start)
                with self._condition:
                    self._condition.wait_for(partial(self._may_read, start, stop))
                    if self._stopped:
                        return
                    passed = self._ends[stop - 1] <= self._merged
                if not passed and not self._read_window(self._reads[start:stop]):
                    return
                with self._condition:
                    self._read = stop
                    self._condition.notify_all()
                start = stop
        finally:
            with self._condition:
                self._ended = True
                self._condition.notify_all()

    def _may_read(self, start: int, stop: int) -> bool:
        """Keys [start, stop) may be read now: within the budget, next after the merge's key, or
        holding a key the merge waits for."""
        before = self._ends[start - 1] if start else 0
        return (
            self._stopped
            or self._ends[stop - 1] - self._merged <= self._budget
            or before <= self._merged
            or start <= self._wanted
        )

    def _window_end(self, start: int) -> int:
        """The end of the window of keys from ``start``: ``WINDOW_BYTES`` of them, at least one key."""
        before = self._ends[start - 1] if start else 0
        stop = start + 1
        while stop < len(self._reads) and self._ends[stop] - before <= WINDOW_BYTES:
            stop += 1
        return stop

    @staticmethod
    def _read_window(window: Sequence[tuple[str, Sequence[Checkpoint]]]) -> bool:
        """Every source's bytes of ``window`` requested, then read; False when a source failed."""
        by_sources: dict[int, tuple[Sequence[Checkpoint], list[str]]] = {}  # keys read from the same sources
        for key, checkpoints in window:
            by_sources.setdefault(id(checkpoints), (checkpoints, []))[1].append(key)
        try:
            for step in ("request", "read_ahead"):
                for checkpoints, keys in by_sources.values():
                    for checkpoint in checkpoints:
                        getattr(checkpoint, step)(keys)
        except (
            OSError,
            ValueError,
            AttributeError,
            CheckpointError,
        ):  # closed, gone, no such reader: the merge will say
            return False
        return True
