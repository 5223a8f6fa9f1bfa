"""Run the real ``automerge`` entry point in-process and capture exit code and output."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest

from automerge import cli


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> CliResult:
    old_argv = sys.argv
    sys.argv = ["automerge", *map(str, args)]
    cli.err_console.file = sys.stderr
    cli.console.file = sys.stdout
    code = 0
    try:
        cli.main()
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    finally:
        sys.argv = old_argv
        cli._state["debug"] = False
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)
