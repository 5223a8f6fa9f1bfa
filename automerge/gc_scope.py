"""The garbage collector's full passes kept off the objects that outlive a long call.

A full collection walks every tracked object. After ``import automerge.merge`` (torch, transformers,
pydantic) and 100 opened sources there are ~450 K of them, 0.1–0.24 s a pass on a 2-core machine,
and opening 100 tiny SDXL sources ran ~15 such passes, a 100-source TIES export two or three (each a
pause of the merge loop), though neither makes many objects that live on. ``long_lived_frozen``
moves what is alive on entry to the permanent generation (``gc.freeze``) for the call, and back
(``gc.unfreeze``) when the outermost such call leaves; objects made inside are collected as always.
A caller's own ``gc.freeze`` is left alone: then nothing is frozen or unfrozen here.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0  # calls inside long_lived_frozen, all threads together
_frozen_here = False  # whether the outermost call froze (nobody else had)


@contextmanager
def long_lived_frozen() -> Iterator[None]:
    """Run the body with the objects alive on entry out of the collector's passes (see the module)."""
    global _depth, _frozen_here
    with _lock:
        if _depth == 0:
            _frozen_here = gc.get_freeze_count() == 0
            if _frozen_here:
                gc.freeze()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _frozen_here:
                gc.unfreeze()
                _frozen_here = False
