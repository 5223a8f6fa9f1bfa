"""Trial throughput of several workers on one study against one worker (issue 13), on this machine.

One tiny SD1 hidden-target study (weighted sum, 2 searched groups, 2 images of 96² in 8 Euler steps per
trial, random sampler, no baselines, no early stopping) is run from a fresh storage with
``automerge optimize --workers N --no-export`` for each N, one torch thread per worker, side by side in
one run. Two throughputs: over the wall time (process start and model loading included) and steady
(from the first trial's end to the last's, all workers running). The storages measured:
SQLite (default) and the journal file. Prints a table and writes JSON::

    python benchmarks/workers_throughput.py --workers 1,2,3 --trials 36

On a CPU machine the workers share its cores, so N workers speed a study up by at most (cores / 1);
on N GPUs each worker renders on its own GPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from _common import RESULTS, machine_info, print_table, work_folder, write_json


@dataclass(frozen=True)
class Row:
    storage: str
    workers: int
    trials: int
    wall_s: float
    completed: int
    steady_s: float  # from the first trial's end to the last's: start-up and model loading excluded

    @property
    def trials_per_minute(self) -> float:
        return 60.0 * self.completed / self.wall_s

    @property
    def steady_trials_per_minute(self) -> float:
        """Trials per minute once every worker is running: (completed − 1) / steady_s."""
        return 60.0 * (self.completed - 1) / self.steady_s


def _study(folder: Path, *, name: str, trials: int, storage: str | None) -> Path:
    from automerge.tiny import write_tiny

    a, b = folder / "a.safetensors", folder / "b.safetensors"
    if not a.exists():
        write_tiny("sd1", a, seed=1)
        write_tiny("sd1", b, seed=2, like=a, delta=0.5)
    payload = folder / "payload.yaml"
    payload.write_text(
        yaml.safe_dump(
            {
                "defaults": {"steps": 8, "width": 96, "height": 96, "scheduler": "euler", "seeds": [1, 2]},
                "items": [{"prompt": "a red house by the sea"}],
            }
        )
    )
    study = {
        "name": name,
        "models": {"a": str(a), "b": str(b)},
        "method": "weighted_sum",
        "search": {"alpha": {"groups": {"TEXT": ["BASE"], "UNET": ["IN00", "IN01", "M00", "OUT11"]}}},
        "payloads": [str(payload)],
        "reward": {"reference": {"metric": "mse", "target": {"params": {"alpha": 0.3}}}},
        "sampler": {"name": "random", "seed": 0},
        "baselines": False,
        "early_stopping": None,
        "trials": trials,
        "render": {"device": "cpu"},
        **({"storage": storage} if storage else {}),
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _run(study: Path, workers: int) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "automerge", "optimize", str(study), "--workers", str(workers), "--no-export"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(
            f"{study.name} with {workers} workers failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return time.perf_counter() - started


def _completed(study: Path) -> tuple[int, float]:
    """Completed trials, and seconds from the first one's end to the last one's."""
    import optuna

    from automerge.study import find_study, load_study_file

    found = find_study(load_study_file(study))
    done = found.get_trials(states=(optuna.trial.TrialState.COMPLETE,)) if found else []
    ends = sorted(t.datetime_complete for t in done)
    return len(done), (ends[-1] - ends[0]).total_seconds() if len(ends) > 1 else float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,3", help="worker counts to compare")
    parser.add_argument("--trials", type=int, default=36)
    parser.add_argument("--storages", default="sqlite,journal")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=RESULTS / "workers_throughput.json")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",")]
    rows: list[Row] = []
    with work_folder(args.workdir, prefix="automerge-workers-") as folder:
        for storage in args.storages.split(","):
            for workers in counts:
                name = f"{storage}-{workers}w"
                for leftover in folder.glob(f"{name}*"):
                    if leftover.is_file():
                        leftover.unlink()
                url = f"journal:{name}.journal" if storage == "journal" else None
                study = _study(folder, name=name, trials=args.trials, storage=url)
                wall = _run(study, workers)
                rows.append(Row(storage, workers, args.trials, wall, *_completed(study)))
                print(f"{name}: {wall:.1f} s", flush=True)
    base = {row.storage: row for row in rows if row.workers == counts[0]}
    print_table(
        [
            [
                r.storage,
                str(r.workers),
                f"{r.completed}/{r.trials}",
                f"{r.wall_s:.1f}",
                f"{r.trials_per_minute:.1f}",
                f"{r.trials_per_minute / base[r.storage].trials_per_minute:.2f}×",
                f"{r.steady_trials_per_minute:.1f}",
                f"{r.steady_trials_per_minute / base[r.storage].steady_trials_per_minute:.2f}×",
            ]
            for r in rows
        ],
        title="Trial throughput by worker count (CPU, tiny SD1)",
        columns=[
            "storage",
            "workers",
            "completed",
            "wall s",
            "trials/min",
            f"vs {counts[0]} worker",
            "steady trials/min",
            f"steady vs {counts[0]}",
        ],
        right_aligned=True,
    )
    write_json(args.json, {"machine": machine_info("cpu"), "args": vars(args), "rows": rows})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
