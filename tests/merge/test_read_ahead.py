"""The export's read-ahead thread (``merge/read_ahead``): every key's sources asked in order (each
window requested from every source before any is read), never more than the budget ahead of the merge
unless the merge waits for a key, keys the merge passed skipped, failures kept to itself."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from automerge.checkpoints import TensorInfo, open_safetensors
from automerge.errors import CheckpointError
from automerge.merge import export_merge, plan_merge, recipe_from_data
from automerge.merge.read_ahead import ReadAhead


class _Source:
    """A checkpoint of keys of 1 MiB each that records what it is asked to read ahead, and how far the
    merge had come (``merged()``, bytes) when it was asked."""

    def __init__(
        self,
        name: str,
        fail_at: str | None = None,
        merged: Callable[[], int] = lambda: 0,
        log: list[tuple[str, str, str]] | None = None,
    ) -> None:
        self.name, self.fail_at, self.merged = name, fail_at, merged
        self.log = [] if log is None else log  # (step, source, first key), shared by the sources
        self.asked: list[str] = []
        self.asked_at: list[int] = []
        self.requested: list[str] = []
        self.changed = threading.Condition()

    def info(self, key: str) -> TensorInfo:
        return TensorInfo((1 << 18,), torch.float32)

    def request(self, keys: Sequence[str]) -> None:
        self.requested.extend(keys)
        self.log.append(("request", self.name, keys[0]))

    def read_ahead(self, keys: Sequence[str]) -> None:
        if self.fail_at in keys:
            raise CheckpointError(f"{self.name}: gone")
        self.log.append(("read", self.name, keys[0]))
        with self.changed:
            self.asked.extend(keys)
            self.asked_at.extend(self.merged() for _ in keys)
            self.changed.notify_all()

    def wait_for(self, count: int) -> None:
        """Until ``count`` keys were asked for, or the read-ahead thread has ended (a broken one: the
        test's checks of what was asked then fail); no wall time is assumed."""
        with self.changed:
            while len(self.asked) < count and _read_ahead_running():
                self.changed.wait(0.01)  # woken by each ask; the poll only notices a thread that ended


def _read_ahead_running() -> bool:
    return any(thread.name == "automerge-read-ahead" for thread in threading.enumerate())


def _reads(sources: Sequence[_Source], keys: int) -> list[tuple[str, list[_Source]]]:
    shared = list(sources)  # one sequence object: a window's keys are asked of each source in one call
    return [(f"k{i}", shared) for i in range(keys)]


def test_sources_are_read_in_order_and_at_most_the_budget_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys of 2 MiB (both sources), a budget of 6 MiB: each key is asked for only once the merge has
    passed all but the 3 keys before it (or it is the next one), and a key the merge passed is not."""
    monkeypatch.setattr("automerge.merge.read_ahead.WINDOW_BYTES", 2 << 20)  # one key of both sources
    merged = [0]  # bytes through the last key passed, moved before the read-ahead is told
    a, b = _Source("a", merged=lambda: merged[0]), _Source("b", merged=lambda: merged[0])

    def passed(ahead: ReadAhead, index: int) -> None:
        merged[0] = (index + 1) * (2 << 20)
        ahead.passed(f"k{index}")

    with ReadAhead(_reads([a, b], 20), budget=6 << 20) as ahead:
        a.wait_for(3)
        b.wait_for(3)
        assert a.asked == b.asked == ["k0", "k1", "k2"]  # k3 would be 8 MiB ahead
        passed(ahead, 0)
        a.wait_for(4)
        passed(ahead, 9)  # the merge ran past: k4 … k9 are not read any more
        a.wait_for(7)
        b.wait_for(7)
    assert a.asked == b.asked == ["k0", "k1", "k2", "k3", "k10", "k11", "k12"]
    for key, at in zip(a.asked + b.asked, a.asked_at + b.asked_at, strict=True):
        index = int(key[1:])
        assert (index + 1) * (2 << 20) - at <= 6 << 20 or index * (2 << 20) <= at, (key, at)


def test_a_source_that_fails_stops_the_read_ahead_not_the_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("automerge.merge.read_ahead.WINDOW_BYTES", 1 << 20)
    a = _Source("a", fail_at="k2")
    with ReadAhead(_reads([a], 6), budget=1 << 40) as ahead:
        a.wait_for(2)
        for thread in [t for t in threading.enumerate() if t.name == "automerge-read-ahead"]:
            thread.join()  # it ends by itself at k2 (a thread that went on would ask k3 … k5 and end)
        ahead.ready("k5")  # the thread has ended: the merge reads k5 itself, it does not wait
    assert a.asked == ["k0", "k1"]


def test_the_merge_waits_for_its_keys_window_and_lifts_the_budget_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``ready(key)`` returns once the key's window was read (requested from both sources first, then
    read): for a key the budget alone would never let the thread reach (the merge passed nothing),
    the windows up to it are read all the same; a key outside the reads does not wait."""
    monkeypatch.setattr("automerge.merge.read_ahead.WINDOW_BYTES", 4 << 20)  # two keys of both sources
    log: list[tuple[str, str, str]] = []
    a, b = _Source("a", log=log), _Source("b", log=log)
    with ReadAhead(_reads([a, b], 12), budget=4 << 20) as ahead:
        ahead.ready("k0")
        assert a.asked[:2] == b.asked[:2] == ["k0", "k1"]
        assert log[:4] == [
            ("request", "a", "k0"),
            ("request", "b", "k0"),
            ("read", "a", "k0"),
            ("read", "b", "k0"),
        ]
        ahead.ready("k7")  # 16 MiB ahead of the merge: past the budget
        assert a.asked[:8] == b.asked[:8] == [f"k{i}" for i in range(8)]
        assert a.requested[:8] == b.requested[:8] == a.asked[:8]
        ahead.ready("not-a-key")
    assert "k11" not in a.asked  # never wanted, never within the budget


def test_the_export_reads_each_sources_keys_ahead_once(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TIES export over a, b, d with base c: every merged key of every source and each key copied
    from A is asked for once, in the export's order, and the output is the one without read-ahead."""
    from automerge.checkpoints._safetensors_reader import SafetensorsCheckpoint

    data = {"models": {k: str(tiny_models[k]) for k in "abdc"}, "method": "ties", "params": {"density": 0.4}}
    asked: dict[str, list[str]] = {}
    original = SafetensorsCheckpoint.read_ahead

    def record(self: SafetensorsCheckpoint, keys: Sequence[str]) -> None:
        asked.setdefault(self.path.name, []).extend(keys)
        original(self, keys)

    def export(out: Path) -> bytes:
        with plan_merge(recipe_from_data(data, source="t.yaml"), source="t.yaml") as plan:
            export_merge(plan, out)
        return out.read_bytes()

    monkeypatch.setattr(SafetensorsCheckpoint, "read_ahead", record)
    read_ahead = export(tmp_path / "ahead.safetensors")
    with open_safetensors(tiny_models["a"]) as a:
        exported = [key for key in a.keys() if not key.startswith("model_ema")]
    a, b, c, d = (asked[tiny_models[name].name] for name in "abcd")
    assert sorted(a) == sorted(exported)
    assert set(b) == set(c) == set(d) and set(b) < set(exported) and b == [key for key in a if key in set(b)]
    assert all(len(keys) == len(set(keys)) for keys in asked.values())

    class _Off(ReadAhead):
        def __init__(self, reads: Sequence[object], **_: object) -> None:
            super().__init__([])

    monkeypatch.setattr("automerge.merge.export.ReadAhead", _Off)
    assert export(tmp_path / "plain.safetensors") == read_ahead
