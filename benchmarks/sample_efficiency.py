"""Sample efficiency of the samplers (issue 5): how fast each one recovers hidden per-block weights.

A hidden-target problem per family, built like ``studies/demo.yaml`` but with every block searched:

- models: two tiny checkpoints from ``write_tiny`` (b = fine-tune of a: ``like=a``, ``delta=0.5``);
- search: ``weighted_sum`` alpha per block in [0, 1] — SD1: 26 blocks (BASE, IN00–IN11, M00,
  OUT00–OUT11), SDXL: 20 blocks (BASE, IN00–IN08, M00, OUT00–OUT08);
- secret: alpha per block drawn once, ``random.Random(SECRET_SEED).uniform(0.1, 0.9)`` per block in
  the family's block order, rounded to 2 decimals (printed and written to the JSON);
- reward: negative MSE against the target's own renders (``reward.reference.target``), so the optimum
  is known: the target scores exactly 0 (measured once per family and recorded as ``optimum``);
- payload: ``--prompts`` prompts × 1 seed at ``--px`` pixels, 4 Euler steps, cfg 1.0.

One ``StudyRuntime`` per family (engine, renderer and reward are built once; the target's reference
images are rendered once), then per sampler and seed an in-memory Optuna study with the sampler
``automerge optimize`` would build for ``sampler: {name, seed, startup_trials}``, whose objective is
``runtime.evaluate(runtime.space.block_params(values), runtime.jobs)``; no storage, artifacts or export.

Measured per run:

- ``trials_to_eps``: the first trial (1-based) whose reward ≥ optimum − ε, where
  ε = ``--epsilon`` × (optimum − reward of uniform alpha 0.5), i.e. the run must close (1 − ε) of the
  gap between the naive midpoint merge and the target; None when not reached;
- best reward after each ``--checkpoints`` trial count;
- mean |recovered − secret| alpha over blocks, for the best trial;
- sampler seconds per trial: the ``timings`` user attr ``sampler``: the gap from the end of the
  previous trial's evaluation to the start of this one's, the ``suggest_float`` calls included (Optuna
  samples the relative/multivariate proposal lazily at the first suggest, not before the objective
  starts), so Optuna's own work (tell, ask) is in it too; mean over trials.

Prints a table (means over seeds) and writes JSON atomically::

    python benchmarks/sample_efficiency.py                       # full: 2 families x 5 samplers x 5 seeds x 200
    python benchmarks/sample_efficiency.py --families sd1 --samplers gp,tpe,random --seeds 2 \\
        --trials 40 --checkpoints 20,40                          # reduced
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from _common import RESULTS, write_json

from automerge.arch import ARCHITECTURES
from automerge.study import StudyFile, StudyRuntime, load_study_file, make_sampler

DEFAULT_JSON = RESULTS / "sample_efficiency.json"
SECRET_SEED = 5  # issue 5
SECRET_RANGE = (0.1, 0.9)
PROMPTS = (
    "a lighthouse on a cliff at dusk, oil painting",
    "portrait of an old fisherman, photo",
    "a bowl of red apples on a wooden table",
)


def secret_weights(blocks: Sequence[str], *, seed: int = SECRET_SEED) -> dict[str, float]:
    """alpha[block] = round(U(0.1, 0.9), 2), drawn in block order from ``random.Random(seed)``."""
    rng = random.Random(seed)
    return {block: round(rng.uniform(*SECRET_RANGE), 2) for block in blocks}


def write_problem(folder: Path, family: str, *, px: int, prompts: int, startup: int) -> Path:
    """Write the payload and study files of one family's hidden-target problem; return the study."""
    payload = {
        "defaults": {"steps": 4, "cfg": 1.0, "width": px, "height": px, "scheduler": "euler", "seeds": [1]},
        "items": [{"prompt": prompt} for prompt in PROMPTS[:prompts]],
    }
    blocks = ARCHITECTURES.get(family).merge_blocks
    study = {
        "name": f"sample-efficiency-{family}",
        "models": {"a": f"{family}-a.safetensors", "b": f"{family}-b.safetensors"},
        "generate": {
            "a": {"tiny": family, "seed": 1},
            "b": {"tiny": family, "seed": 2, "like": "a", "delta": 0.5},
        },
        "method": "weighted_sum",
        "search": {"alpha": {"blocks": "all", "low": 0.0, "high": 1.0}},
        "payloads": ["payload.yaml"],
        "reward": {"reference": {"metric": "mse", "target": {"params": {"alpha": secret_weights(blocks)}}}},
        "sampler": {"name": "gp", "seed": 0, "startup_trials": startup},
        "render": {"device": "cpu", "dtype": "fp32", "batch_size": 8},
    }
    (folder / "payload.yaml").write_text(yaml.safe_dump(payload, sort_keys=False))
    path = folder / f"{family}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


@dataclass(frozen=True)
class RunResult:
    family: str
    sampler: str
    seed: int
    trials: int
    trials_to_eps: int | None
    best_at: dict[str, float]  # str(checkpoint) -> best reward within the first checkpoint trials
    best: float
    weight_error: float  # mean |recovered - secret| over blocks, best trial
    sampler_seconds: float  # mean per trial
    evaluate_seconds: float  # mean per trial (merge + render + score)


def sampler_config(study: StudyFile, name: str, *, seed: int, startup: int) -> StudyFile:
    """``study`` with ``sampler: {name, seed, startup_trials}`` (checked: an unknown name raises)."""
    config = study.sampler.model_validate({"name": name, "seed": seed, "startup_trials": startup})
    return study.model_copy(update={"sampler": config})


def study_sampler(study: StudyFile) -> optuna.samplers.BaseSampler:
    """The sampler ``automerge optimize`` builds for a new ``study``."""
    return make_sampler(study.sampler)


def run_one(
    runtime: StudyRuntime,
    *,
    sampler: str,
    seed: int,
    trials: int,
    startup: int,
    threshold: float,
    checkpoints: Sequence[int],
    secret: Mapping[str, float],
) -> RunResult:
    """One in-memory Optuna study of ``trials`` trials with sampler ``sampler`` seeded ``seed``."""
    chosen = study_sampler(sampler_config(runtime.study, sampler, seed=seed, startup=startup))
    study = optuna.create_study(direction="maximize", sampler=chosen)
    last_finished = [time.perf_counter()]

    def objective(trial: optuna.Trial) -> float:
        values = runtime.space.suggest(trial)  # Optuna samples relative params lazily, here
        started = time.perf_counter()
        sampler_seconds = started - last_finished[0]
        evaluation = runtime.evaluate(runtime.space.block_params(values), runtime.jobs)
        timings = dict(evaluation.timings, sampler=sampler_seconds, evaluate=time.perf_counter() - started)
        trial.set_user_attr("timings", {k: round(v, 6) for k, v in timings.items()})
        last_finished[0] = time.perf_counter()
        return evaluation.value

    study.optimize(objective, n_trials=trials)
    values = [t.value for t in study.trials]
    running = [max(values[: i + 1]) for i in range(len(values))]
    reached = next((i + 1 for i, v in enumerate(values) if v >= threshold), None)
    best = study.best_trial
    error = statistics.fmean(abs(best.params[f"alpha.{block}"] - secret[block]) for block in secret)
    timings = [t.user_attrs["timings"] for t in study.trials]
    return RunResult(
        family=runtime.plan.arch.name,
        sampler=sampler,
        seed=seed,
        trials=len(values),
        trials_to_eps=reached,
        best_at={str(c): running[min(c, len(running)) - 1] for c in checkpoints},
        best=running[-1],
        weight_error=error,
        sampler_seconds=statistics.fmean(t["sampler"] for t in timings),
        evaluate_seconds=statistics.fmean(t["evaluate"] for t in timings),
    )


def uniform_values(runtime: StudyRuntime, value: float) -> dict[str, float]:
    return {d.name: value for d in runtime.space.dimensions}


def family_problem(runtime: StudyRuntime, secret: Mapping[str, float], *, epsilon: float) -> dict[str, float]:
    """optimum = reward of the secret itself; midpoint = reward of uniform 0.5; threshold = optimum − ε·gap."""
    space = runtime.space
    optimum = runtime.evaluate(
        space.block_params({f"alpha.{b}": v for b, v in secret.items()}), runtime.jobs
    ).value
    midpoint = runtime.evaluate(space.block_params(uniform_values(runtime, 0.5)), runtime.jobs).value
    pure_a = runtime.evaluate(space.block_params(uniform_values(runtime, 0.0)), runtime.jobs).value
    gap = optimum - midpoint
    return {
        "optimum": optimum,
        "midpoint": midpoint,
        "pure_a": pure_a,
        "epsilon": epsilon * gap,
        "threshold": optimum - epsilon * gap,
    }


def summarize(results: Sequence[RunResult], checkpoints: Sequence[int]) -> list[dict[str, Any]]:
    """Per (family, sampler): means over seeds; trials_to_eps as the median over seeds that reached it."""
    rows = []
    keys = sorted({(r.family, r.sampler) for r in results}, key=lambda k: (k[0], k[1]))
    for family, sampler in keys:
        runs = [r for r in results if r.family == family and r.sampler == sampler]
        reached = [r.trials_to_eps for r in runs if r.trials_to_eps is not None]
        rows.append(
            {
                "family": family,
                "sampler": sampler,
                "seeds": len(runs),
                "reached": len(reached),
                "trials_to_eps_median": statistics.median(reached) if reached else None,
                "best_at": {str(c): statistics.fmean(r.best_at[str(c)] for r in runs) for c in checkpoints},
                "weight_error": statistics.fmean(r.weight_error for r in runs),
                "sampler_seconds": statistics.fmean(r.sampler_seconds for r in runs),
                "evaluate_seconds": statistics.fmean(r.evaluate_seconds for r in runs),
            }
        )
    return rows


def print_table(rows: Sequence[Mapping[str, Any]], checkpoints: Sequence[int], trials: int) -> None:
    head = ["family", "sampler", "reached ε (of seeds)", "trials to ε (median)"]
    head += [f"best@{c}" for c in checkpoints if c <= trials]
    head += ["mean |w − secret|", "sampler s/trial", "eval s/trial"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for row in rows:
        cells = [
            row["family"],
            row["sampler"],
            f"{row['reached']}/{row['seeds']}",
            "—" if row["trials_to_eps_median"] is None else f"{row['trials_to_eps_median']:g}",
        ]
        cells += [f"{row['best_at'][str(c)]:.2e}" for c in checkpoints if c <= trials]
        cells += [
            f"{row['weight_error']:.3f}",
            f"{row['sampler_seconds']:.3f}",
            f"{row['evaluate_seconds']:.2f}",
        ]
        print("| " + " | ".join(cells) + " |")


def save(
    args: argparse.Namespace,
    *,
    problems: Mapping[str, Any],
    results: Sequence[RunResult],
    checkpoints: Sequence[int],
    started: float,
) -> None:
    """Write the JSON (after every run, so an interrupted benchmark keeps what it measured)."""
    write_json(
        args.json,
        {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads},
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "secret_seed": SECRET_SEED,
            "problems": problems,
            "summary": summarize(results, checkpoints),
            "runs": [asdict(r) for r in results],
            "wall_seconds": time.perf_counter() - started,
        },
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="sd1,sdxl")
    parser.add_argument("--samplers", default="tpe,gp,cmaes,qmc,random")
    parser.add_argument("--seeds", type=int, default=5, help="sampler seeds 0 … N-1 per sampler")
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--checkpoints", default="50,100,200")
    parser.add_argument("--startup", type=int, default=10, help="sampler startup_trials (tpe, gp, cmaes)")
    parser.add_argument(
        "--epsilon", type=float, default=0.1, help="fraction of the optimum − uniform-0.5 gap"
    )
    parser.add_argument("--px", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=2, choices=(1, 2, 3))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    checkpoints = [int(c) for c in args.checkpoints.split(",") if c.strip()]
    results: list[RunResult] = []
    problems: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sample-efficiency-") as temp:
        for family in families:
            folder = Path(temp) / family
            folder.mkdir()
            study = load_study_file(
                write_problem(folder, family, px=args.px, prompts=args.prompts, startup=args.startup)
            )
            for name in samplers:  # every name checked before the runtime is built
                sampler_config(study, name, seed=0, startup=args.startup)
            runtime = StudyRuntime(study)
            try:
                secret = secret_weights([d.name.split(".", 1)[1] for d in runtime.space.dimensions])
                problem = family_problem(runtime, secret, epsilon=args.epsilon)
                problems[family] = {**problem, "blocks": len(secret), "secret": secret}
                print(f"{family}: {len(secret)} blocks, {problem}", flush=True)
                for sampler in samplers:
                    for seed in range(args.seeds):
                        result = run_one(
                            runtime,
                            sampler=sampler,
                            seed=seed,
                            trials=args.trials,
                            startup=args.startup,
                            threshold=problem["threshold"],
                            checkpoints=checkpoints,
                            secret=secret,
                        )
                        results.append(result)
                        save(
                            args, problems=problems, results=results, checkpoints=checkpoints, started=started
                        )
                        print(
                            f"  {family} {sampler} seed {seed}: best {result.best:.3e}, "
                            f"to ε {result.trials_to_eps}, |w−s| {result.weight_error:.3f}, "
                            f"sampler {result.sampler_seconds:.3f}s, eval {result.evaluate_seconds:.2f}s "
                            f"[{time.perf_counter() - started:.0f}s]",
                            flush=True,
                        )
            finally:
                runtime.close()
    rows = summarize(results, checkpoints)
    print_table(rows, checkpoints, args.trials)
    save(args, problems=problems, results=results, checkpoints=checkpoints, started=started)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
