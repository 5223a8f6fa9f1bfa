"""long_lived_frozen: what is alive on entry is out of the collector's passes for the call, and back after."""

from __future__ import annotations

import gc

import pytest

from automerge.gc_scope import long_lived_frozen


@pytest.fixture(autouse=True)
def _nothing_frozen():
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_objects_alive_on_entry_are_frozen_and_given_back():
    with long_lived_frozen():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0


def test_objects_made_inside_are_still_collected():
    collected = []

    class Cycle:
        def __del__(self):
            collected.append(True)

    with long_lived_frozen():
        first, second = Cycle(), Cycle()
        first.other, second.other = second, first
        del first, second
        gc.collect()
        assert len(collected) == 2


def test_nested_calls_unfreeze_once_at_the_outermost():
    with long_lived_frozen():
        with long_lived_frozen():
            pass
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0


def test_a_callers_own_freeze_is_left_alone():
    """Nothing more is frozen, and the caller's objects stay frozen (the count may only drop: frozen
    objects that die leave the permanent generation)."""
    gc.freeze()
    frozen = gc.get_freeze_count()
    made_since = [{} for _ in range(1000)]  # tracked, young: frozen too if the scope froze
    with long_lived_frozen():
        assert gc.get_freeze_count() < frozen + len(made_since)
    assert 0 < gc.get_freeze_count() <= frozen


def test_frozen_again_after_an_error():
    with pytest.raises(RuntimeError), long_lived_frozen():
        raise RuntimeError("boom")
    assert gc.get_freeze_count() == 0
    with long_lived_frozen():
        assert gc.get_freeze_count() > 0
