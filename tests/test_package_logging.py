"""What automerge does to other libraries' logging: one misleading notice dropped, by the subpackages that
load those libraries (render, rewards), nothing else, and nothing at ``import automerge``."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

import automerge.render  # noqa: F401  (the import installs the filter)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def import_utils_log() -> tuple[logging.Logger, _Collect]:
    logger = logging.getLogger("transformers.utils.import_utils")
    handler = _Collect()
    logger.addHandler(handler)
    yield logger, handler
    logger.removeHandler(handler)


def test_the_torchvision_fallback_notice_is_dropped_and_other_warnings_kept(
    import_utils_log: tuple[logging.Logger, _Collect],
) -> None:
    logger, handler = import_utils_log
    logger.warning(
        "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` "
        "for backward compatibility. Install torchvision to use the default backend, or import "
        "`CLIPImageProcessorPil` directly to silence this warning."
    )
    logger.warning("some other import problem")
    assert handler.messages == ["some other import problem"]


# That importing diffusers' pipelines prints no torchvision notice is checked in a fresh interpreter
# by tests/test_architecture.py's `automerge render` run (one fresh process for both checks).


def test_importing_automerge_alone_touches_no_logger_and_loads_no_library() -> None:
    code = (
        "import logging, sys, automerge\n"
        "print(logging.getLogger('transformers.utils.import_utils').filters, "
        "[m for m in ('torch', 'diffusers', 'transformers', 'optuna') if m in sys.modules])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[] []"
