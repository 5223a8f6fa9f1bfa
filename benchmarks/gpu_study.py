"""Real sizes on a real GPU (issue 6): SD1- and SDXL-size studies end to end, per-stage timings against
the floors, VRAM and host-memory peaks, and the low-VRAM (offload) mode for 24 GB cards.

One invocation, nothing downloaded. Per phase (``--phase``):

1. sources a, b: random weights at every real key shape (``_sources.real_infos``: fp16, EMA and
   scheduler buffers left out), σ·N(0, 1) drawn on the device with a seeded generator (σ = ``--std``;
   values don't change the work); reused when ``--workdir`` already holds the same file;
2. reward models at real size with random weights, written as the published files plus manifests
   (``automerge.testing.write_random_*``): ImageReward (``ImageReward.pt``: BLIP ViT-L/16 + BERT-base,
   447 M parameters, with ``med_config.json`` and a 30,522-token ``vocab.txt``) and the LAION
   aesthetic predictor (a CLIP ViT-L/14 folder + MLP head), combined by a composite manifest;
3. a short study with ``run_study`` (weighted_sum, α per block, GP sampler, baselines first, no export);
4. from the study's Optuna storage, each stage's median seconds per trial (the trials' ``timings``
   user attribute) and its share of the median trial; then, with a fresh runtime of the same study:
   live re-merge of every searched block against the copy floor (``torch.add(a, b, out=o)`` over each
   re-merged block's element count: 2 reads + 1 write, as weighted_sum), with offload also against
   the host→device floor (both sources' block bytes copied from pinned memory); images/s rendered in
   batches vs one by one; scorer images/s; peak VRAM (allocated and reserved, reset per stage) and peak
   host RSS (sampled every 10 ms);
5. ``sdxl-lowvram``: the same with ``EngineOptions(offload=True)`` (sources in pinned host memory,
   streamed per block) under a per-process VRAM cap (``--vram-cap-gib``, 22 GiB: a 24 GB card less
   its CUDA context), so an allocation past the cap fails the trial instead of passing unnoticed.
   (the study file's ``render.offload: true``).

Device timings use CUDA events (perf_counter on the CPU); medians of ``--reps`` after a warm-up.
``--cpu-smoke``: tiny models at 64×64, 2 trials, tiny reward models, on the CPU: every code path
(table, JSON, offload mode) in about a minute. Prints one table; writes ``gpu_study-<phases>.json`` to
``--out`` (default ``$OUT``, else ``benchmarks/results/``) after every phase. Not a test: nothing is
asserted. Renders are timed once each way (``max(1, reps // 3)``): an SDXL batch takes seconds.

Phases, settings and files: ``_gpu_phases.py``; measurements: ``_gpu_measure.py``; here the phase
loop, the table and the command line.

    python benchmarks/gpu_study.py --cpu-smoke
    python benchmarks/gpu_study.py --phase sd1,sdxl --out $OUT        # then --phase sdxl-lowvram
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from _common import GB, GIB, RESULTS, machine_info, package_versions, print_table, release, write_json
from _gpu_measure import PhaseResult, measure_runtime, recorded, run_phase_study, vram_cap
from _gpu_phases import PHASES, Phase, Settings, make_rewards, make_sources, make_study

from automerge.dtypes import STORAGE_NAMES
from automerge.study.records import STAGES

VERSIONS = ("torch", "diffusers", "transformers", "optuna", "pydantic", "safetensors")


def run_phase(phase: Phase, settings: Settings) -> PhaseResult:
    """Files, the study, then the micro-benchmarks with a fresh runtime; errors recorded per step."""
    started = time.perf_counter()
    device = torch.device(settings.device)
    cap = settings.vram_cap_gib if phase.offload and device.type == "cuda" else None
    result = PhaseResult(phase, cap)
    kind = "tiny" if phase.tiny else "real"
    with recorded(result, "files"):
        print(f"[{phase.name}] sources and reward models in {settings.workdir}")
        sources = make_sources(phase, settings, settings.workdir / "sources")
        result.sources_bytes = {k: p.stat().st_size for k, p in sources.items()}
        reward = make_rewards(settings, settings.workdir / f"rewards-{kind}", tiny=phase.tiny)
        study_file = make_study(
            phase, settings, settings.workdir / phase.name, sources=sources, reward=reward
        )
    if result.errors:
        result.wall_s = time.perf_counter() - started
        return result
    with vram_cap(cap, device=device):
        with recorded(result, "study"):
            print(f"[{phase.name}] study: {settings.trials} trials on {settings.device}")
            result.study = run_phase_study(phase, settings, study_file)
        release(device)
        with recorded(result, "micro-benchmarks"):
            print(f"[{phase.name}] re-merge, render and score benchmarks")
            measure_runtime(result, study_file, settings)
        release(device)
    result.wall_s = time.perf_counter() - started
    return result


# -- report ----------------------------------------------------------------------------------------


def _s(value: float | None) -> str:
    """Seconds as ms below 1 s."""
    if value is None:
        return "—"
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def _gib(value: int | None) -> str:
    return "—" if value is None else f"{value / GIB:.2f} GiB"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _fits(result: PhaseResult) -> str:
    study = result.study
    if result.vram_cap_gib is None or study is None:
        return "—"
    fits = study.failed == 0 and not result.errors
    return f"{'yes' if fits else 'NO'} (cap {result.vram_cap_gib:g} GiB)"


def table_rows(result: PhaseResult) -> dict[str, str]:
    """Metric → formatted value for one phase (one column of the table)."""
    study, remerge, render, score = result.study, result.remerge, result.render, result.score
    rows: dict[str, str] = {}
    if study is not None:
        rows["trials completed / failed"] = f"{study.completed} / {study.failed}"
        rows["study startup (load, build)"] = _s(study.startup_s)
        for stage in STAGES:
            stat = study.stages.get(stage)
            rows[f"  {stage} (median, share)"] = (
                "—" if stat is None else f"{_s(stat.median_s)} ({stat.share:.1%})"
            )
        rows["trial (median total)"] = _s(study.trial_median_s)
        rows["study peak VRAM alloc / reserved"] = (
            f"{_gib(study.memory.vram_allocated_bytes)} / {_gib(study.memory.vram_reserved_bytes)}"
        )
        rows["study peak host RSS (anon)"] = (
            f"{_gib(study.memory.rss_bytes)} ({_gib(study.memory.rss_anon_bytes)})"
        )
        rows["fits a 24 GB card"] = _fits(result)
    if result.construct_memory is not None:
        rows["runtime build (s, VRAM alloc)"] = (
            f"{_s(result.construct_s)} ({_gib(result.construct_memory.vram_allocated_bytes)})"
        )
    if remerge is not None:
        rows["re-merge all blocks (median)"] = f"{_s(remerge.merge_median_s)} ({remerge.blocks} blocks)"
        rows["copy floor (add, 2 reads + 1 write)"] = (
            f"{_s(remerge.floor_median_s)} ({3 * remerge.bytes_out / GB:.2f} GB)"
        )
        rows["re-merge / copy floor"] = _ratio(remerge.ratio)
        if remerge.h2d_s is not None:
            rows["offload floor (H2D + add)"] = _s(remerge.offload_floor_s)
            rows["re-merge / offload floor"] = _ratio(remerge.offload_ratio)
    if render is not None:
        rows[f"render img/s batch {render.batch_size} / batch 1"] = (
            f"{render.batched_images_per_s:.3g} / {render.single_images_per_s:.3g} ({_ratio(render.speedup)})"
        )
        rows["render peak VRAM alloc"] = _gib(render.memory.vram_allocated_bytes)
    if score is not None:
        rows["scorer img/s (composite)"] = f"{score.images_per_s:.3g}"
    if result.errors:
        rows["errors"] = "; ".join(e.split(":", 1)[0] for e in result.errors)
    rows["phase wall"] = _s(result.wall_s)
    return rows


def print_results(results: Sequence[PhaseResult], *, title: str) -> None:
    """One column per phase, one row per metric; then every error."""
    columns = [table_rows(r) for r in results]
    metrics = list(dict.fromkeys(m for column in columns for m in column))
    print(title)
    rows = [(metric, *(column.get(metric, "—") for column in columns)) for metric in metrics]
    names = ["metric", *(r.phase.name for r in results)]
    print_table(rows, title="gpu_study: per phase", columns=names, right_aligned=True)
    for result in results:
        for error in result.errors:
            print(f"[{result.phase.name}] {error}")


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny models on the CPU: every code path, ~1 min"
    )
    parser.add_argument("--device", help="cuda (default) or cpu (--cpu-smoke)")
    parser.add_argument("--phase", help=f"comma list of {', '.join(PHASES)}")
    parser.add_argument("--trials", type=int, help="trials per study (default 12; smoke 2)")
    parser.add_argument("--images", type=int, help="payload images per trial (default 4; smoke 2)")
    parser.add_argument("--steps", type=int, help="sampling steps (default 20; smoke 4)")
    parser.add_argument("--batch-size", type=int, help="render batch (default 4; smoke 2)")
    parser.add_argument("--reps", type=int, help="repetitions of the re-merge, floor and scorer (default 5)")
    parser.add_argument("--dtype", choices=STORAGE_NAMES, help="live/render dtype (fp16 on a GPU)")
    parser.add_argument("--std", type=float, default=0.02, help="σ of the random real-size weights")
    parser.add_argument(
        "--vram-cap-gib", type=float, default=22.0, help="allocator cap of the low-VRAM phase"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; smoke 1)")
    parser.add_argument("--workdir", type=Path, help="sources, rewards and studies (kept; sources reused)")
    parser.add_argument(
        "--out", type=Path, help="folder for gpu_study-<phases>.json (default $OUT or benchmarks/results)"
    )
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    smoke = args.cpu_smoke
    device = args.device or ("cpu" if smoke else "cuda")
    default_phases = "tiny-sd1,tiny-sdxl-lowvram" if smoke else "sd1,sdxl,sdxl-lowvram"
    phases = tuple(p.strip() for p in (args.phase or default_phases).split(",") if p.strip())
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise SystemExit(f"--phase: unknown {', '.join(unknown)}; known: {', '.join(PHASES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch {torch.__version__} sees no CUDA GPU (try --cpu-smoke)")
    out = args.out or Path(os.environ.get("OUT") or RESULTS)
    default_workdir = Path("/tmp") / ("automerge-gpu-study-smoke" if smoke else "automerge-gpu-study")
    return Settings(
        device=device,
        phases=phases,
        trials=args.trials or (2 if smoke else 12),
        images=args.images or (2 if smoke else 4),
        steps=args.steps or (4 if smoke else 20),
        batch_size=args.batch_size or (2 if smoke else 4),
        dtype=args.dtype or ("fp16" if device.startswith("cuda") else "fp32"),
        reps=args.reps or (2 if smoke else 5),
        std=args.std,
        vram_cap_gib=args.vram_cap_gib,
        workdir=args.workdir or default_workdir,
        out=out,
        threads=args.threads or (1 if smoke else None),
    )


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    settings = settings_from(parse_args(argv))
    settings.workdir.mkdir(parents=True, exist_ok=True)
    if settings.threads:  # 1 on a shared CPU: oversubscribed OpenMP threads spin (100× slower renders)
        torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    data: dict[str, Any] = {
        "machine": {**machine_info(settings.device), "versions": package_versions(VERSIONS)},
        "settings": asdict(settings),
        "phases": {},
    }
    results = []
    json_path = settings.out / f"gpu_study-{'_'.join(settings.phases)}.json"
    for name in settings.phases:
        result = run_phase(PHASES[name], settings)
        results.append(result)
        data["phases"][name] = result
        data["wall_s"] = time.perf_counter() - started
        data["peak_rss_lifetime_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        write_json(json_path, data)
    machine = data["machine"]
    where = machine.get("gpu", machine["cpu"])
    print_results(
        results,
        title=f"gpu_study on {where}: {settings.trials} trials, {settings.images} images, {settings.steps} steps, "
        f"{settings.dtype}, torch {torch.__version__}",
    )
    print(f"wrote {json_path} ({data['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
