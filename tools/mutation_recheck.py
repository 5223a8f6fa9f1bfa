"""A pytest plugin for checking many mutmut mutants in one process (how TESTING.md's sample was checked
in full, 12-02): for each mutant of a plan ``{mutant name: [test node id, ...]}`` it sets
``MUTANT_UNDER_TEST`` and runs those tests in order until one fails (the killer), with the session
fixtures made once, unmutated, and module fixtures made again per mutant. One JSON line per mutant
is appended to ``$MM_OUT`` (``{"mutant", "killer", "ran", "of", "seconds"}``; a rerun skips the mutants
already there). Run from ``mutants/`` (made by ``mutmut run``, stopped once the folder is written)::

    cd mutants && MM_PLAN=plan.json MM_OUT=results.jsonl PYTHONPATH=../tools \
        python -m pytest -p mutation_recheck -n 0 -q tests/study/test_objective.py tests/...

``MM_ITEM_LIMIT`` (s, default 90) fails a test that runs longer (a mutant's endless loop counts as
killed, "(timeout)"); ``MM_MUTANT_BUDGET`` (s) stops a mutant's list early. Every killer should be
checked to pass on the unmutated code (a plan with the mutant name "" does that).
"""

import json
import os
import signal
import time
from collections.abc import Iterable
from typing import Any, NoReturn

import pytest
from _pytest.runner import runtestprotocol

ITEM_LIMIT_S = int(os.environ.get("MM_ITEM_LIMIT", "90"))
MUTANT_BUDGET_S = float(os.environ.get("MM_MUTANT_BUDGET", "1e9"))


class _Chain:
    def __init__(self, chain: Iterable[Any]) -> None:
        self._chain = list(chain)

    def listchain(self) -> list[Any]:
        return self._chain


class _TimedOut(BaseException):
    pass


def _alarm(signum: int, frame: object) -> NoReturn:
    raise _TimedOut


def _common(a: list[Any], b: list[Any]) -> list[Any]:
    out = []
    for x, y in zip(a, b, strict=False):
        if x is not y:
            break
        out.append(x)
    return out


def pytest_runtestloop(session: pytest.Session) -> bool:
    plan = json.load(open(os.environ["MM_PLAN"]))
    done = set()
    out_path = os.environ["MM_OUT"]
    if os.path.exists(out_path):
        done = {json.loads(line)["mutant"] for line in open(out_path)}
    items = {item.nodeid: item for item in session.items}
    state = session._setupstate
    previous = signal.signal(signal.SIGALRM, _alarm)
    # session fixtures made once, unmutated (a fixture that fails under a mutant stays failed)
    warm, seen = [], set()
    for item in session.items:
        for name in item.fixturenames:
            defs = item._fixtureinfo.name2fixturedefs.get(name)
            if defs and defs[-1].scope == "session" and name not in seen:
                seen.add(name)
                if item not in warm:
                    warm.append(item)
    os.environ["MUTANT_UNDER_TEST"] = ""
    for item in warm:
        chain = item.listchain()
        state.teardown_exact(_Chain(_common(list(state.stack.keys()), chain[:-1])))
        reports = runtestprotocol(item, nextitem=_Chain(chain[:-1]), log=False)
        if any(r.failed for r in reports):
            with open(out_path + ".warmup-failures", "a") as f:
                f.write(item.nodeid + "\n")
    for mutant, nodeids in plan.items():
        if mutant in done:
            continue
        state.teardown_exact(_Chain([session]))  # module fixtures made again for each mutant
        os.environ["MUTANT_UNDER_TEST"] = mutant
        killer, ran, started = None, 0, time.monotonic()
        for nodeid in nodeids:
            item = items.get(nodeid)
            if item is None:
                continue
            if time.monotonic() - started > MUTANT_BUDGET_S:
                break
            chain = item.listchain()
            current = list(state.stack.keys())
            state.teardown_exact(_Chain(_common(current, chain[:-1])))
            ran += 1
            signal.setitimer(signal.ITIMER_REAL, ITEM_LIMIT_S)
            try:
                reports = runtestprotocol(item, nextitem=_Chain(chain[:-1]), log=False)
                failed = any(r.failed for r in reports)
            except _TimedOut:
                failed = "timeout"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if failed:
                killer = nodeid if failed is True else f"{nodeid} (timeout)"
                break
        with open(out_path, "a") as f:
            f.write(
                json.dumps(
                    {
                        "mutant": mutant,
                        "killer": killer,
                        "ran": ran,
                        "of": len(nodeids),
                        "seconds": round(time.monotonic() - started, 1),
                    }
                )
                + "\n"
            )
    os.environ["MUTANT_UNDER_TEST"] = ""
    state.teardown_exact(None)
    signal.signal(signal.SIGALRM, previous)
    return True
