"""Bringing a memory map's pages in ahead of their first touch (Linux ``madvise``).

``MADV_POPULATE_READ`` (Linux ≥ 5.14) reads the range's pages and maps them, blocking only the
calling thread: a thread that runs it ahead of the merge overlaps the disk with the computation,
which page faults in the merge's own threads serialize (a TIES export of 10 SD1 sources from the
disk: 47–50 → 26–34 s, BENCHMARKS.md). Older kernels get ``MADV_WILLNEED`` (asynchronous
readahead); other systems nothing. Advisory only: every failure is ignored, the later reads fault
the pages in as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import mmap
import sys
from collections.abc import Callable

MADV_WILLNEED = 3
MADV_POPULATE_READ = 22
PAGE = mmap.PAGESIZE


def map_address(mapped: mmap.mmap) -> int:
    """The address of a writable (or copy-on-write) map's first byte."""
    view = ctypes.c_char.from_buffer(mapped)
    try:
        return ctypes.addressof(view)
    finally:
        del view  # the export would keep the map from closing


_advice = MADV_POPULATE_READ


def populate(address: int, length: int) -> None:
    """Read the pages of [address, address + length) into memory and map them; nothing where the
    system cannot (see the module doc)."""
    global _advice
    madvise = _madvise()
    if madvise is None or length <= 0:
        return
    start = address - address % PAGE
    length += address - start
    if (
        madvise(start, length, _advice) != 0
        and _advice == MADV_POPULATE_READ
        and ctypes.get_errno() == errno.EINVAL
    ):
        _advice = MADV_WILLNEED  # this kernel predates MADV_POPULATE_READ: asynchronous readahead
        madvise(start, length, _advice)


def request(address: int, length: int) -> None:
    """Start reading the pages of [address, address + length) and return (``MADV_WILLNEED``: the
    reads are queued, exactly the range, none around it); nothing where the system cannot.

    ``populate`` alone, on pages not yet read, reads around each first touch as much as the disk's
    read-ahead setting (8 MiB on this project's VM): asked for the first keys of 100 sources it read
    800 MiB before returning (0.73 s), asked after ``request`` exactly the 6 MiB asked (0.01 s)."""
    madvise = _madvise()
    if madvise is None or length <= 0:
        return
    start = address - address % PAGE
    madvise(start, length + address - start, MADV_WILLNEED)


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    """libc's ``madvise`` (ctypes releases the GIL for the call), None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    function = libc.madvise
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function
