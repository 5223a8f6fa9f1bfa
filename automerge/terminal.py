"""Terminal helpers shared by the commands: a status line for long phases."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console

Status = Callable[[str], None]
"""``status(text)``: told what a long phase is doing as it starts."""


@contextmanager
def startup_status(console: Console) -> Iterator[Status]:
    """A spinner with the current phase; each finished phase stays as a line with its duration."""
    current: list[tuple[str, float]] = []

    def finish() -> None:
        if current:
            text, started = current.pop()
            console.print(f"[dim]{text} ({time.perf_counter() - started:.1f} s)[/]", highlight=False)

    with console.status("starting") as spinner:

        def status(text: str) -> None:
            finish()
            current.append((text, time.perf_counter()))
            spinner.update(text)

        try:
            yield status
        finally:
            finish()
