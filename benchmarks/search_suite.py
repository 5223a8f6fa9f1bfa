"""The search suite (issue 12): which search strategy finds a good merge in the fewest trials, on many
hidden-target problems that nobody tuned a default to.

Problems (``_search_problems.py``): 20 per family (tiny SD1, tiny SDXL) by default, drawn from
``--problem-seed``: grouped and all-blocks weighted sums, TIES with two searched parameters, and
problems with non-identifiable blocks. Each run is an in-memory Optuna study of ``--trials`` trials of
one strategy on one problem, whose objective is the study runtime's ``evaluate`` (merge in place,
render ``--images`` images of ``--px`` pixels in ``--steps`` Euler steps, negative MSE to the secret's
renders; the first three trials are the baselines pure A, pure B and uniform 0.5, as ``automerge
optimize`` enqueues them, unless ``--no-baselines``). ``--workers 4`` simulates 4 concurrent workers:
trials are asked 4 at a time and told together, so each proposal sees 3 running trials.

Measured per run: the best-so-far value after every trial as gap closed (``_search_stats.py``: 0 =
uniform 0.5, 1 = the secret), trials to 90 % gap closed, the sampler's own seconds per trial (the
gap between evaluations, the suggest calls included) and the evaluation seconds per trial. Reported
per family and strategy: medians over problems × seeds with 90 % bootstrap intervals, a Markdown table,
best-so-far PNG curves, and every run in the JSON (tables: ``_search_report.py``). Runs are written as they finish, and a rerun with
the same ``--json`` skips the runs it already has::

    python benchmarks/search_suite.py                                  # the full suite (hours)
    python benchmarks/search_suite.py --report results/search_suite.json results/search_suite_mf.json
    python benchmarks/search_suite.py --families sd1 --kinds groups:2 --strategies gp,random --trials 30
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from _common import RESULTS, machine_info, write_json
from _search_problems import KINDS, Problem, suite, write_models, write_payload, write_study
from _search_report import CHECKPOINTS, MF, Run, load_runs, paired, paired_table, plots, summary, table
from _search_stats import bootstrap_median, interval_text
from _search_strategies import Strategy, strategies

DEFAULT_JSON = RESULTS / "search_suite.json"


# -- one problem, in a worker process ---------------------------------------------------------------


def _value(runtime: Any, trial: Any, values: Mapping[str, float]) -> float | None:
    """The trial's value; with previews (multi-fidelity), None when the pruner stops it after one."""
    params = runtime.space.block_params(values)
    for rung, jobs in enumerate(runtime.preview_jobs):
        trial.report(runtime.evaluate(params, jobs).value, rung)
        if trial.should_prune():
            return None
    return runtime.evaluate(params, runtime.jobs).value


def _evaluate_batch(
    runtime: Any, study: Any, strategy_trials: int, workers: int
) -> tuple[float, list[float]]:
    """Run the study's trials ``workers`` at a time: (sampler seconds in total, each trial's
    evaluation seconds in trial order)."""
    from optuna.trial import TrialState

    sampler_s, seconds = 0.0, []
    while len(study.trials) < strategy_trials:
        started = time.perf_counter()
        asked = [study.ask() for _ in range(min(workers, strategy_trials - len(study.trials)))]
        proposals = [runtime.space.suggest(trial) for trial in asked]
        sampler_s += time.perf_counter() - started
        for trial, values in zip(asked, proposals, strict=True):
            started = time.perf_counter()
            value = _value(runtime, trial, values)
            seconds.append(time.perf_counter() - started)
            started = time.perf_counter()
            study.tell(trial, value, state=TrialState.PRUNED if value is None else TrialState.COMPLETE)
            sampler_s += time.perf_counter() - started
    return sampler_s, seconds


def solve(task: Mapping[str, Any]) -> dict[str, Any]:
    """Every strategy × seed of one problem (``task`` is plain data: it crosses a process boundary):
    ``{"runs": [...], "spearman": [...]}``."""
    import optuna
    import torch

    from automerge.study import StudyRuntime, load_study_file

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    problem: Problem = task["problem"]
    runtime = StudyRuntime(load_study_file(Path(task["study"])))
    factories: dict[str, Strategy] = strategies()
    results, agreement = [], []
    try:
        secret = runtime.evaluate(runtime.space.block_params(problem.secret), runtime.jobs).value
        midpoint = runtime.evaluate(runtime.space.block_params(_midpoint(runtime)), runtime.jobs).value
        for name, seed in task["runs"]:
            pruner = _pruner(task)
            study = optuna.create_study(
                direction="maximize", sampler=factories[name.removesuffix(MF)](seed), pruner=pruner
            )
            if task["baselines"]:  # as `automerge optimize` does: pure A, pure B, uniform 0.5 first
                for baseline in runtime.space.baselines():
                    study.enqueue_trial(baseline.values)
            sampler_s, seconds = _evaluate_batch(runtime, study, task["trials"], task["workers"])
            values = [t.value if t.state == optuna.trial.TrialState.COMPLETE else None for t in study.trials]
            run = Run(
                problem.name,
                problem.family,
                problem.kind,
                name,
                seed,
                task["workers"],
                secret,
                midpoint,
                values,
                sampler_s / len(values),
                sum(seconds) / len(values),
                [value is not None for value in values],
                seconds,
            )
            results.append(asdict(run))
        if task["spearman"] and runtime.preview_jobs:
            agreement.append(_spearman(runtime, problem, points=task["spearman"]))
    finally:
        runtime.close()
    return {"runs": results, "spearman": agreement}


def _spearman(runtime: Any, problem: Problem, *, points: int) -> dict[str, Any]:
    """Spearman's ρ between the preview's and the full payload's values on ``points`` random points."""
    import random

    from scipy.stats import spearmanr

    rng = random.Random(problem.name)
    previews, fulls = [], []
    for _ in range(points):
        params = runtime.space.block_params(
            {d.name: rng.uniform(d.low, d.high) for d in runtime.space.dimensions}
        )
        previews.append(runtime.evaluate(params, runtime.preview_jobs[0]).value)
        fulls.append(runtime.evaluate(params, runtime.jobs).value)
    return {
        "problem": problem.name,
        "family": problem.family,
        "rho": float(spearmanr(previews, fulls).statistic),
    }


def _pruner(task: Mapping[str, Any]) -> Any:
    """With previews, the product's promotion rule (``FidelityPruner``); else none."""
    import optuna

    from automerge.study.pruners import FidelityPruner

    if not task["promote"]:
        return optuna.pruners.NopPruner()
    inner = optuna.pruners.NopPruner()
    return FidelityPruner(rungs=1, promote=task["promote"], startup_trials=10, inner=inner)


def _midpoint(runtime: Any) -> dict[str, float]:
    return {d.name: (d.low + d.high) / 2 for d in runtime.space.dimensions}


# -- the suite --------------------------------------------------------------------------------------


def _tasks(
    args: argparse.Namespace, problems: Sequence[Problem], done: set[str], work: Path
) -> list[dict[str, Any]]:
    preview = args.preview or None
    payload = write_payload(
        work, px=args.px, steps=args.steps, seeds=range(1, args.images + 1), preview=preview
    )
    models = {family: write_models(work / "models", family) for family in {p.family for p in problems}}
    labels = [name + MF if preview else name for name in args.strategies]
    tasks = []
    for problem in problems:
        runs = [
            (label, seed)
            for label in labels
            for seed in range(args.seeds)
            if f"{problem.name}/{label}/{seed}/w{args.workers}" not in done
        ]
        if runs or args.spearman:
            study = write_study(
                problem, work / "studies", models[problem.family], payload=payload, previews=bool(preview)
            )
            tasks.append(
                {
                    "problem": problem,
                    "study": str(study),
                    "runs": runs,
                    "trials": args.trials,
                    "workers": args.workers,
                    "baselines": not args.no_baselines,
                    "promote": args.promote if preview else 0.0,
                    "spearman": args.spearman,
                }
            )
    return tasks


def save(
    path: Path,
    args: argparse.Namespace,
    runs: Sequence[Run],
    started: float,
    agreement: Sequence[Mapping[str, Any]],
) -> None:
    write_json(
        path,
        {
            "machine": machine_info("cpu"),
            "args": {
                k: v if isinstance(v, int | float | str | list) else str(v) for k, v in vars(args).items()
            },
            "summary": summary(runs, CHECKPOINTS),
            "runs": [asdict(r) for r in runs],
            "spearman": list(agreement),
            "wall_seconds": time.perf_counter() - started,
        },
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="sd1,sdxl")
    parser.add_argument(
        "--kinds", default=",".join(f"{k}:{n}" for k, n in KINDS.items()), help="kind:count,..."
    )
    parser.add_argument("--strategies", default="random,tpe,gp,gp-rank")
    parser.add_argument("--seeds", type=int, default=1, help="strategy seeds per problem")
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--workers", type=int, default=1, help="simulated concurrent workers")
    parser.add_argument("--preview", default="", help="multi-fidelity: the cheaper fidelity, e.g. steps:1")
    parser.add_argument("--promote", type=float, default=0.34, help="with --preview: fraction promoted")
    parser.add_argument(
        "--spearman", type=int, default=0, help="with --preview: N random points ranked twice"
    )
    parser.add_argument(
        "--no-baselines", action="store_true", help="do not enqueue A, B and uniform 0.5 first"
    )
    parser.add_argument("--problem-seed", type=int, default=12)
    parser.add_argument("--px", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument(
        "--processes", type=int, default=2, help="problems solved in parallel, 1 torch thread each"
    )
    parser.add_argument("--workdir", type=Path, default=RESULTS / "search_suite_work")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument(
        "--report", type=Path, nargs="+", default=[], help="only tables and plots from these result files"
    )
    parser.add_argument("--default", default="auto", help="with --report: the strategy compared pairwise")
    args = parser.parse_args(argv)
    args.families = [f for f in args.families.split(",") if f]
    args.strategies = [s for s in args.strategies.split(",") if s]
    args.kinds = {k: int(n) for k, n in (item.split(":") for item in args.kinds.split(",") if item)}
    args.preview = {k: int(n) for k, n in (item.split(":") for item in args.preview.split(",") if item)}
    unknown = sorted(set(args.strategies) - set(strategies()))
    if unknown:
        parser.error(f"unknown strategies {unknown}; known: {', '.join(strategies())}")
    return args


def _solved(tasks: Sequence[Mapping[str, Any]], *, processes: int) -> Iterator[dict[str, Any]]:
    """Each task's runs as it finishes: in this process for ``processes`` 1, else in a pool."""
    if processes == 1:
        yield from (solve(task) for task in tasks)
        return
    with concurrent.futures.ProcessPoolExecutor(max_workers=processes) as pool:
        for done in concurrent.futures.as_completed([pool.submit(solve, task) for task in tasks]):
            yield done.result()


def main(argv: Sequence[str] | None = None) -> list[Run]:
    args = parse_args(argv)
    if args.report:
        report(args.report, default=args.default)
        return []
    started = time.perf_counter()
    runs = load_runs(args.json)
    agreement = load_agreement(args.json)
    problems = suite(args.families, seed=args.problem_seed, kinds=args.kinds)
    tasks = _tasks(args, problems, {r.key for r in runs}, args.workdir)
    print(
        f"{len(problems)} problems, {sum(len(t['runs']) for t in tasks)} runs to do ({len(runs)} on file)",
        flush=True,
    )
    for results in _solved(tasks, processes=args.processes):
        agreement += results["spearman"]
        for data in results["runs"]:
            runs.append(Run(**data))
            print(f"  {_run_line(runs[-1])} [{time.perf_counter() - started:.0f}s]", flush=True)
        save(args.json, args, runs, started, agreement)
    names = {p.name for p in problems}
    selected = [r for r in runs if r.problem in names and r.strategy.removesuffix(MF) in args.strategies]
    print(_spearman_text(agreement))
    print(table(summary(selected)))
    for path in plots(selected, args.json.parent, name=args.json.stem):
        print(f"wrote {path}")
    print(f"wrote {args.json}")
    return selected


def _run_line(run: Run) -> str:
    curve = run.curve()
    checkpoints = [c for c in dict.fromkeys((*CHECKPOINTS, len(curve))) if c <= len(curve)]
    return (
        f"{run.problem} {run.strategy} seed {run.seed}: gap closed "
        + " ".join(f"@{c} {curve[c - 1]:.2f}" for c in checkpoints)
        + f", sampler {run.sampler_s:.3f}s/trial"
    )


def _spearman_text(agreement: Sequence[Mapping[str, Any]]) -> str:
    lines = []
    latest = {a["problem"]: a for a in agreement}  # a rerun measures a problem again: count it once
    for family in sorted({a["family"] for a in latest.values()}):
        rhos = [a["rho"] for a in latest.values() if a["family"] == family]
        lines.append(
            f"{family}: Spearman ρ preview/full, median over {len(rhos)} problems: "
            + interval_text(bootstrap_median(rhos), lambda v: f"{v:.2f}")
        )
    return "\n".join(lines)


def load_agreement(path: Path) -> list[Mapping[str, Any]]:
    return list(json.loads(path.read_text()).get("spearman", [])) if path.exists() else []


def report(paths: Sequence[Path], *, default: str) -> None:
    """Tables and plots from result files, running nothing: the sequential full-fidelity runs of every
    file side by side (one table, plots named after the first file) with the default's paired
    differences; then each file's concurrent-worker and multi-fidelity runs beside the sequential runs
    of the same strategies on the same problems."""
    loaded = {path: load_runs(path) for path in paths}
    main: dict[Any, Run] = {}
    for runs in loaded.values():
        for run in runs:
            if run.workers == 1 and not run.strategy.endswith(MF):
                main.setdefault(run.key, run)
    sequential = list(main.values())
    print(f"## {', '.join(p.name for p in paths)}\n\n{table(summary(sequential))}\n")
    print(f"{paired_table(paired(sequential, default))}\n")
    for path in plots(sequential, paths[0].parent, name=paths[0].stem):
        print(f"wrote {path}")
    for path, runs in loaded.items():
        extra = [r for r in runs if r.workers != 1 or r.strategy.endswith(MF)]
        if not extra:
            continue
        keys = {(r.problem, r.strategy.removesuffix(MF)) for r in extra}
        beside = [r for r in sequential if (r.problem, r.strategy) in keys]
        print(f"\n## {path.name}\n\n{table(summary([*beside, *extra]))}\n")
        spearman = _spearman_text(load_agreement(path))
        if spearman:
            print(spearman + "\n")
        for plot in plots([*beside, *extra], path.parent, name=path.stem):
            print(f"wrote {plot}")


if __name__ == "__main__":
    main()
