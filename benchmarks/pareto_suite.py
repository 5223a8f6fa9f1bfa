"""The Pareto suite (issue 18): which sampler finds the best front of two objectives in the fewest
trials, on generated problems nobody tuned a default to.

Problems: the search suite's (``_search_problems.py``: grouped, cut, all-block, TIES and frozen
weighted sums on tiny models), each with a second secret drawn over the same groups, so the two
objectives — negative MSE to each secret merge's renders — conflict. Each run is an in-memory Optuna
study with two maximized objectives, its sampler built by the product (``make_multi_objective_sampler``
with ``sampler.name``), the baselines (A, B, uniform 0.5) first as ``automerge optimize`` queues them.

Measured per run: after every trial, the hypervolume of the front so far exactly as early stopping
measures it (``stopping.front_hypervolumes``: each objective scaled by the baselines' range, reference
point at their worst). Per problem, a run's hypervolume is divided by the largest any run reached on
that problem (1 = the best front found); reported per sampler: medians over problems × seeds at 15,
30 and 60 trials with 90 % bootstrap intervals, and paired differences against ``--default``::

    python benchmarks/pareto_suite.py                          # 20 SD1 problems × auto, tpe, nsga2, random
    python benchmarks/pareto_suite.py --report                 # tables from the JSON on file
"""

from __future__ import annotations

import argparse
import concurrent.futures
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from _common import RESULTS, machine_info, write_json
from _search_problems import KINDS, Problem, draw, study_fields, suite, write_models, write_payload
from _search_stats import bootstrap_mean, bootstrap_median, interval_text

DEFAULT_JSON = RESULTS / "pareto_suite.json"
CHECKPOINTS = (15, 30, 60)


@dataclass(frozen=True)
class ParetoRun:
    problem: str
    kind: str
    sampler: str
    seed: int
    hypervolumes: list[float]  # front hypervolume after each trial (baselines included)
    sampler_seconds: float  # per trial: the ask, where Optuna's samplers compute their proposal
    front_size: int

    @property
    def key(self) -> str:
        return f"{self.problem}/{self.sampler}/{self.seed}"


def second_secret(problem: Problem, *, seed: int) -> dict[str, float]:
    """Another secret over the problem's dimensions, drawn as the first was (``draw``)."""
    rng = random.Random(f"{seed}/second/{problem.name}")
    return {name: draw(*problem.ranges[name.split(".")[0]], rng) for name in problem.secret}


def write_two_objective_study(
    problem: Problem, other: Mapping[str, float], folder: Path, models: Mapping[str, Path], payload: Path
) -> Path:
    """The problem's study file with ``objectives:`` near-1 (the first secret) and near-2 (the second)."""
    study = study_fields(problem, folder, models, payload=payload)
    targets = [problem.target(), replace(problem, secret=dict(other)).target()]
    study["objectives"] = [
        {"reward": {"reference": {"metric": "mse", "target": {"params": target}}}, "name": f"near-{i + 1}"}
        for i, target in enumerate(targets)
    ]
    path = folder / f"{problem.name}-pareto.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def solve(task: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every sampler × seed of one problem (``task`` is plain data: it crosses a process boundary)."""
    import warnings

    import optuna
    import torch

    from automerge.study import StudyRuntime, load_study_file
    from automerge.study.config import SamplerConfig
    from automerge.study.records import baseline_attrs
    from automerge.study.samplers import make_multi_objective_sampler
    from automerge.study.stopping import front_hypervolumes

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore")
    problem: Problem = task["problem"]
    runtime = StudyRuntime(load_study_file(Path(task["study"])))
    runs = []
    try:
        for name, seed in task["runs"]:
            sampler = make_multi_objective_sampler(SamplerConfig(name=name, seed=seed))
            study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
            for baseline in runtime.space.baselines():
                study.enqueue_trial(baseline.values, user_attrs=baseline_attrs(baseline.label))
            asking = 0.0
            for _ in range(task["trials"]):
                started = time.perf_counter()
                trial = study.ask()
                values = runtime.space.suggest(trial)
                asking += time.perf_counter() - started
                evaluation = runtime.evaluate(runtime.space.block_params(values), runtime.jobs)
                study.tell(trial, list(evaluation.objective_scores.values()))
            trials = study.get_trials(deepcopy=False)
            trace = [volume for _, volume in front_hypervolumes(trials, maximize=[True, True])]
            run = ParetoRun(
                problem.name,
                problem.kind,
                name,
                seed,
                trace,
                asking / task["trials"],
                len(study.best_trials),
            )
            runs.append(asdict(run))
    finally:
        runtime.close()
    return runs


def relative(runs: Sequence[ParetoRun]) -> dict[str, list[float]]:
    """Each run's hypervolume trace divided by the largest any run reached on its problem."""
    best: dict[str, float] = {}
    for run in runs:
        best[run.problem] = max(best.get(run.problem, 0.0), max(run.hypervolumes, default=0.0))
    return {
        run.key: [volume / best[run.problem] if best[run.problem] > 0 else 0.0 for volume in run.hypervolumes]
        for run in runs
    }


def _at(trace: Sequence[float], trials: int) -> float:
    return trace[min(trials, len(trace)) - 1]


def table(runs: Sequence[ParetoRun], *, default: str) -> str:
    """Medians (90 % intervals) of the relative hypervolume at each checkpoint per sampler, and each
    sampler's paired mean difference from ``default`` on the same problem and seed."""
    scaled = relative(runs)
    samplers = sorted({r.sampler for r in runs}, key=lambda s: (s != default, s))
    lines = [
        "| sampler | runs | "
        + " | ".join(f"HV @{n}" for n in CHECKPOINTS)
        + " | "
        + " | ".join(f"− {default} @{n}" for n in CHECKPOINTS)
        + " | ask s/trial |",
        "|---|---|" + "---|" * (2 * len(CHECKPOINTS)) + "---|",
    ]
    by_key = {(r.problem, r.seed, r.sampler): r for r in runs}
    for sampler in samplers:
        mine = [r for r in runs if r.sampler == sampler]
        medians = [
            interval_text(bootstrap_median([_at(scaled[r.key], n) for r in mine]), lambda v: f"{v:.3f}")
            for n in CHECKPOINTS
        ]
        paired = []
        for n in CHECKPOINTS:
            differences = [
                _at(scaled[r.key], n) - _at(scaled[by_key[(r.problem, r.seed, default)].key], n)
                for r in mine
                if (r.problem, r.seed, default) in by_key
            ]
            paired.append(
                "–"
                if sampler == default or not differences
                else interval_text(bootstrap_mean(differences), lambda v: f"{v:+.3f}")
            )
        ask = sorted(r.sampler_seconds for r in mine)[len(mine) // 2]
        lines.append(f"| {sampler} | {len(mine)} | " + " | ".join(medians + paired) + f" | {ask:.3f} |")
    return "\n".join(lines)


def load_runs(path: Path) -> list[ParetoRun]:
    if not path.is_file():
        return []
    import json

    return [ParetoRun(**run) for run in json.loads(path.read_text())["runs"]]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="sd1")
    parser.add_argument(
        "--kinds", default=",".join(f"{k}:{n}" for k, n in KINDS.items()), help="kind:count,..."
    )
    parser.add_argument("--samplers", default="auto,tpe,nsga2,random")
    parser.add_argument("--seeds", type=int, default=1, help="sampler seeds per problem")
    parser.add_argument("--trials", type=int, default=max(CHECKPOINTS))
    parser.add_argument("--problem-seed", type=int, default=12)
    parser.add_argument("--px", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2, help="problems solved in parallel")
    parser.add_argument("--workdir", type=Path, default=RESULTS / "search_suite_work")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--report", action="store_true", help="only the table of the runs on file")
    parser.add_argument("--default", default="auto", help="the sampler compared pairwise")
    args = parser.parse_args(argv)
    args.families = [f for f in args.families.split(",") if f]
    args.samplers = [s for s in args.samplers.split(",") if s]
    args.kinds = {k: int(n) for k, n in (item.split(":") for item in args.kinds.split(",") if item)}
    return args


def main(argv: Sequence[str] | None = None) -> list[ParetoRun]:
    args = parse_args(argv)
    runs = load_runs(args.json)
    if args.report:
        print(table(runs, default=args.default))
        return runs
    started = time.perf_counter()
    problems = suite(args.families, seed=args.problem_seed, kinds=args.kinds)
    payload = write_payload(args.workdir, px=args.px, steps=args.steps, seeds=range(1, args.images + 1))
    models = {family: write_models(args.workdir / "models", family) for family in args.families}
    done = {run.key for run in runs}
    tasks = []
    for problem in problems:
        todo = [
            (name, seed)
            for name in args.samplers
            for seed in range(args.seeds)
            if f"{problem.name}/{name}/{seed}" not in done
        ]
        if todo:
            other = second_secret(problem, seed=args.problem_seed)
            study = write_two_objective_study(
                problem, other, args.workdir / "pareto", models[problem.family], payload
            )
            tasks.append({"problem": problem, "study": str(study), "runs": todo, "trials": args.trials})
    print(f"{len(problems)} problems, {sum(len(t['runs']) for t in tasks)} runs to do ({len(runs)} on file)")
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.processes) as pool:
        for future in concurrent.futures.as_completed([pool.submit(solve, task) for task in tasks]):
            for data in future.result():
                runs.append(ParetoRun(**data))
                last = runs[-1]
                print(
                    f"  {last.key}: HV {last.hypervolumes[-1]:.4f}, front {last.front_size}, "
                    f"ask {last.sampler_seconds:.3f} s [{time.perf_counter() - started:.0f}s]",
                    flush=True,
                )
            write_json(
                args.json,
                {
                    "machine": machine_info("cpu"),
                    "args": {
                        k: v if isinstance(v, int | float | str | list) else str(v)
                        for k, v in vars(args).items()
                    },
                    "runs": [asdict(r) for r in runs],
                    "wall_seconds": time.perf_counter() - started,
                },
            )
    print(table(runs, default=args.default))
    print(f"wrote {args.json}")
    return runs


if __name__ == "__main__":
    main()
