"""Terminal helpers shared by the commands: a status line for long phases, durations as words."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape

Status = Callable[[str], None]
"""``status(text)``: told what a long phase is doing as it starts."""


def duration_text(seconds: float) -> str:
    """``42 s``, ``3 min 07 s``, ``2 h 05 min``: as precise as a reader of a run's length needs."""
    whole = round(seconds)
    if whole < 60:
        return f"{seconds:.0f} s" if seconds >= 9.5 else f"{seconds:.1f} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min"


@contextmanager
def startup_status(console: Console) -> Iterator[Status]:
    """A spinner with the current phase; each finished phase stays as a line with its duration."""
    current: list[tuple[str, float]] = []

    def finish() -> None:
        if current:
            text, started = current.pop()
            console.print(f"[dim]{escape(text)} ({time.perf_counter() - started:.1f} s)[/]", highlight=False)

    with console.status("starting") as spinner:

        def status(text: str) -> None:
            finish()
            current.append((text, time.perf_counter()))
            spinner.update(text)

        try:
            yield status
        finally:
            finish()
