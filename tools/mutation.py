"""Mutation testing (issue 15): mutmut mutates ``automerge/merge``, ``automerge/study`` and
``automerge/checkpoints`` one small change at a time (``[tool.mutmut]`` in pyproject.toml) and runs the
tests that cover each changed function; a mutant no test fails on is a gap in the suite.

    pip install -e '.[mutation]'
    python tools/mutation.py --hours 2             # run (resumable: results stay in mutants/), then report
    python tools/mutation.py --report-only         # the table and the survivors of the runs so far
    python tools/mutation.py --sample 300 --seed 1 --hours 3   # a uniform random sample of the mutants
    python tools/mutation.py --sample 300 --test-budget 20     # each mutant against its fastest tests

Not part of ``.ci/run``: a full pass is hours on two cores; ``--sample N`` checks N mutants drawn
uniformly at random (seeded) from all of them and reports the sample's score with a 95 % Wilson
interval, an unbiased estimate of the full pass's score at a fraction of its cost. mutmut runs every
test that calls a mutated function, which for the study loop's hubs is hundreds of tests (a median of
~250 s per surviving mutant); ``--test-budget S`` runs each mutant against its fastest covering tests
up to S seconds only. A mutant killed by some of its tests is killed by all of them, so the score so
measured is a lower bound of the full one.

Writes ``benchmarks/results/mutation.json``
(score per package, every survivor by name) and prints the table TESTING.md quotes. Score = (killed +
timeout) / (all − skipped), mutmut's own formula; "no tests" mutants (no test runs that function) count
as survivors, "not checked" ones (the run stopped first) are left out and reported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("automerge/merge", "automerge/study", "automerge/checkpoints")
KILLED = {"killed", "timeout", "caught by type check"}
SURVIVED = ("survived", "no tests", "suspicious")


DATA_FOLDERS = ("automerge", "payloads", "rewards", "studies", "tests")
"""Folders whose non-Python files the tests read (family tables, manifests, bad-input cases)."""


def refresh_data_files() -> list[str]:
    """Copy every non-Python file under ``DATA_FOLDERS`` whose bytes differ into ``mutants/``: mutmut
    copies them once, when it first makes ``mutants/``, so an edited family table or manifest would
    otherwise fail the stats run (or test the old one) on a resumed run."""
    import shutil

    refreshed = []
    for folder in DATA_FOLDERS:
        for source in sorted((ROOT / folder).rglob("*")):
            if not source.is_file() or source.suffix in (".py", ".pyc") or "__pycache__" in source.parts:
                continue
            copy = ROOT / "mutants" / source.relative_to(ROOT)
            if copy.parent.is_dir() and (not copy.exists() or copy.read_bytes() != source.read_bytes()):
                shutil.copy2(source, copy)
                refreshed.append(source.relative_to(ROOT).as_posix())
    return refreshed


def sample_names(names: list[str], size: int, seed: int) -> list[str]:
    """``size`` names drawn uniformly at random without replacement, the same for the same seed."""
    return sorted(random.Random(seed).sample(sorted(names), min(size, len(names))))


def wilson_interval(successes: int, trials: int) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion (scipy's): unlike p̂ ± 1.96·SE it stays
    inside [0, 1] and holds for a proportion near 1."""
    if trials == 0:
        return (0.0, 1.0)
    from scipy.stats import binomtest

    interval = binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="wilson")
    return (float(interval.low), float(interval.high))


STATS = ROOT / "mutants" / "mutmut-stats.json"
FULL_STATS = ROOT / "mutants" / "mutmut-stats.full.json"


def budget_tests(tests: list[str], durations: dict[str, float], seconds: float) -> list[str]:
    """The fastest of ``tests`` whose durations add up to at most ``seconds`` (at least the fastest)."""
    kept, spent = [], 0.0
    for test in sorted(tests, key=lambda name: (durations.get(name, 0.0), name)):
        spent += durations.get(test, 0.0)
        if kept and spent > seconds:
            break
        kept.append(test)
    return kept


def limit_tests(seconds: float) -> None:
    """Rewrite mutmut's stats so that each function's mutants run its fastest tests up to ``seconds``
    (the full stats are kept beside them and put back by ``restore_tests``)."""
    import shutil

    if not FULL_STATS.exists():
        shutil.copy2(STATS, FULL_STATS)
    stats = json.loads(FULL_STATS.read_text())
    durations = stats["duration_by_test"]
    stats["tests_by_mangled_function_name"] = {
        name: budget_tests(tests, durations, seconds)
        for name, tests in stats["tests_by_mangled_function_name"].items()
    }
    STATS.write_text(json.dumps(stats))


def restore_tests() -> None:
    if FULL_STATS.exists():
        FULL_STATS.replace(STATS)


def run_mutmut(hours: float, children: int, names: list[str] | None = None) -> None:
    """``mutmut run`` (of ``names`` only when given), stopped by SIGINT (mutmut saves what it
    finished) after ``hours``."""
    refreshed = refresh_data_files()
    if refreshed:
        print(f"refreshed {len(refreshed)} data file(s) in mutants/: {', '.join(refreshed[:5])}")
    process = subprocess.Popen(
        [sys.executable, "-m", "mutmut", "run", "--max-children", str(children), *(names or [])], cwd=ROOT
    )
    try:
        process.wait(timeout=hours * 3600)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=600)


def collect() -> dict[str, dict[str, str]]:
    """Each package's mutants by name with their status, from mutmut's ``.meta`` files."""
    from mutmut.stats import status_by_exit_code

    by_package: dict[str, dict[str, str]] = defaultdict(dict)
    for meta in sorted((ROOT / "mutants").rglob("*.py.meta")):
        source = meta.relative_to(ROOT / "mutants").with_suffix("").as_posix()
        package = next((p for p in PACKAGES if source.startswith(p + "/")), None)
        if package is None:
            continue
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            by_package[package][name] = status_by_exit_code[code]
    return by_package


def summarize(by_package: dict[str, dict[str, str]], only: set[str] | None = None) -> dict[str, object]:
    """Score per package and over all three; with ``only``, over those mutants alone (a sample)."""
    if only is not None:
        by_package = {
            package: {name: status for name, status in mutants.items() if name in only}
            for package, mutants in by_package.items()
        }
    rows = {}
    for package in PACKAGES:
        statuses = Counter(by_package.get(package, {}).values())
        checked = sum(n for status, n in statuses.items() if status not in ("not checked", "skipped"))
        killed = sum(statuses[status] for status in KILLED)
        rows[package] = {
            "mutants": sum(statuses.values()),
            "checked": checked,
            "killed": killed,
            "score": killed / checked if checked else None,
            "statuses": dict(statuses),
            "survivors": sorted(
                name for name, status in by_package.get(package, {}).items() if status in SURVIVED
            ),
        }
    checked = sum(row["checked"] for row in rows.values())
    killed = sum(row["killed"] for row in rows.values())
    low, high = wilson_interval(killed, checked)
    return {
        "packages": rows,
        "checked": checked,
        "killed": killed,
        "score": killed / checked if checked else None,
        "score_95": [round(low, 4), round(high, 4)],
    }


def print_table(summary: dict[str, object]) -> None:
    print("| package | mutants | checked | killed | survived | no tests | score |")
    print("|---|---|---|---|---|---|---|")
    for package, row in summary["packages"].items():
        statuses = row["statuses"]
        score = "–" if row["score"] is None else f"{100 * row['score']:.1f} %"
        print(
            f"| {package} | {row['mutants']} | {row['checked']} | {row['killed']} | "
            f"{statuses.get('survived', 0)} | {statuses.get('no tests', 0)} | {score} |"
        )
    score = "–" if summary["score"] is None else f"{100 * summary['score']:.1f} %"
    print(f"| **all three** | | {summary['checked']} | {summary['killed']} | | | **{score}** |")
    low, high = summary["score_95"]
    print(f"95 % interval of the score: {100 * low:.1f} – {100 * high:.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", type=float, default=2.0, help="stop the run after this long")
    parser.add_argument("--children", type=int, default=os.cpu_count() or 2, help="mutants tested at once")
    parser.add_argument("--report-only", action="store_true", help="no run: report the results so far")
    parser.add_argument("--sample", type=int, help="check this many mutants drawn at random, not all")
    parser.add_argument("--seed", type=int, default=1, help="the sample's seed")
    parser.add_argument("--test-budget", type=float, help="seconds of each mutant's fastest tests to run")
    parser.add_argument(
        "--survivors", action="store_true", help="run only the mutants not killed so far (of the sample)"
    )
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/mutation.json")
    args = parser.parse_args()
    started = time.monotonic()
    statuses = {name: status for package in collect().values() for name, status in package.items()}
    sample = sample_names(list(statuses), args.sample, args.seed) if args.sample else None
    to_run = sample
    if args.survivors:
        to_run = sorted(
            name
            for name in (sample if sample else statuses)
            if statuses.get(name) in (*SURVIVED, "not checked")
        )
        print(f"running the {len(to_run)} mutants not killed so far")
    if not args.report_only and (to_run is None or to_run):
        if args.test_budget and not STATS.exists():
            parser.error("--test-budget needs mutmut's stats: run once without it first")
        try:
            if args.test_budget:
                limit_tests(args.test_budget)
            run_mutmut(args.hours, args.children, to_run)
        finally:
            restore_tests()
    summary = summarize(collect(), only=set(sample) if sample else None)
    if sample:
        summary["sample"] = {"size": len(sample), "seed": args.seed, "of": len(statuses)}
    summary["test_budget_s"] = args.test_budget
    summary["run_hours"] = round((time.monotonic() - started) / 3600, 2)
    print_table(summary)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
