"""Render tests run torch on one thread: the tiny 64×64 models gain nothing from more, and OpenMP
threads spinning against each other (2 cores, pytest-xdist workers) make the folder several times
slower. The setting is restored after each test module."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # for the fresh-process test's subprocess
    yield
    torch.set_num_threads(threads)
    if previous is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = previous
