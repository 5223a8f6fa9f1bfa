"""Render and score speed (issue 4): images/s batched against one by one, and the reward models' images/s.

For each family (SD1, SDXL) the pipeline is built the way ``automerge render`` builds it:

- ``--size tiny``: a tiny checkpoint from ``write_tiny`` (real key layout, tiny widths) as "pure A"
  (``plan_checkpoint``) in a ``RenderSession`` (live engine → modules → pipeline), at 64² px;
- ``--size real``: the standard configs of ``automerge.arch`` families with random weights
  (``build_modules(arch.configs)`` → ``pipeline_modules`` → ``build_pipeline``), SD1 at 512², SDXL at
  1024² — only sensible on a GPU.

The same jobs (``--images`` seeds of one prompt set, equal settings) are rendered one by one
(``batch_size`` 1) and batched (``--batch-size``, default 4), alternately, after a warm-up of each;
images/s = images / wall time of ``Renderer.render`` (PIL images returned, so the device is synced).
Then each reward model scores ``--images`` images: the tiny random models of
``automerge.testing`` (``--size tiny``), or an ImageReward with the official real sizes and random
weights (``--size real``: ViT-L/16 + 12-layer BERT-base with cross-attention,
``automerge.testing.write_random_imagereward``), on images of the render size. Medians of ``--reps``
repetitions. Prints a table, writes JSON (atomically)::

    python benchmarks/render_speed.py                                  # tiny, CPU, a few minutes
    python benchmarks/render_speed.py --device cuda --size real        # the GPU targets

Targets (GPU, real size): batched ≥ 1.3× the images/s of one by one; ImageReward scoring ≤ 10% of
the SDXL render time per image. Not a test: timings are never asserted anywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from _common import (
    RESULTS,
    Timing,
    load_average,
    machine_info,
    print_table,
    quiet_libraries,
    release,
    seconds,
    write_json,
)

from automerge.dtypes import STORAGE_NAMES, TORCH_DTYPES

DEFAULT_JSON = RESULTS / "render_speed.json"
PROMPTS = ("a lighthouse on a cliff at dusk, oil painting", "portrait of an old fisherman, photo")
TARGET_BATCH_SPEEDUP = 1.3
TARGET_IMAGEREWARD_SHARE = 0.10
COLUMNS = ("what", "images/s (median)", "s/image", "ratio", "target / notes")


@dataclass(frozen=True)
class SizeSpec:
    """Image side in pixels per family, and the default number of sampler steps."""

    px: Mapping[str, int]
    steps: int


SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec(px={"sd1": 64, "sdxl": 64}, steps=4),
    "real": SizeSpec(px={"sd1": 512, "sdxl": 1024}, steps=20),
}


@dataclass(frozen=True)
class Settings:
    """What to run."""

    device: str
    size: str
    families: tuple[str, ...]
    dtype: str
    images: int
    batch_size: int
    steps: int
    px: int | None  # overrides the size's image side (e.g. a quick check of the real-size code path)
    reps: int
    warmup: int
    threads: int | None

    def side(self, family: str) -> int:
        return self.px or SIZES[self.size].px[family]


# -- pipelines ------------------------------------------------------------------------------------


def tiny_pipeline(family: str, folder: Path, *, device: str, dtype: str) -> Any:
    """The pipeline of a tiny checkpoint, merged as "pure A" like ``automerge render`` does (its
    modules view the session's live weights, which they keep alive)."""
    from automerge.merge import plan_checkpoint
    from automerge.render import RenderConfig, RenderSession
    from automerge.tiny import write_tiny

    plan = plan_checkpoint(write_tiny(family, folder / f"tiny-{family}.safetensors", seed=0))
    try:
        session = RenderSession(plan, RenderConfig(device=device, dtype=dtype))
        session.apply()
    finally:
        plan.close()  # the engine holds its own copies of the sources
    return session.pipeline


def real_pipeline(family: str, *, device: str, dtype: str, seed: int = 0) -> Any:
    """The pipeline of the family's standard (real) configs, default random init (seeded) on the CPU
    in fp32, then moved and cast by ``build_pipeline``."""
    from automerge.arch import ARCHITECTURES
    from automerge.render import build_modules, build_pipeline, pipeline_modules

    arch = ARCHITECTURES.get(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = build_modules(arch.configs)
    live = pipeline_modules(modules, family=family, prediction_type=arch.prediction_type)
    return build_pipeline(live, device=device, dtype=TORCH_DTYPES[dtype])


def make_jobs(count: int, *, side: int, steps: int) -> list[Any]:
    """``count`` jobs of equal settings (one batch group), seeds 0 … count−1, prompts alternating; keys
    as a payload's item 0 would name them."""
    from automerge.render import RenderJob

    return [
        RenderJob(
            key=f"i00-s{seed:04d}", item=0, seed=seed, prompt=PROMPTS[seed % len(PROMPTS)], negative_prompt="",
            steps=steps, cfg=7.0, width=side, height=side, scheduler="euler", clip_skip=1, weight=1.0 / count,
        )
        for seed in range(count)
    ]  # fmt: skip


@dataclass(frozen=True)
class RenderResult:
    family: str
    side: int
    steps: int
    images: int
    batch_size: int
    build_s: float
    single: Timing  # batch_size 1
    batched: Timing
    upcast_vae: int  # images re-decoded in fp32 (fp16 VAE overflow) during the timed runs

    @property
    def single_images_per_s(self) -> float:
        return self.images / self.single.median_s

    @property
    def batched_images_per_s(self) -> float:
        return self.images / self.batched.median_s

    @property
    def speedup(self) -> float:
        return self.batched_images_per_s / self.single_images_per_s


def measure_render(family: str, settings: Settings, folder: Path) -> RenderResult:
    """Build the pipeline, warm up both batch sizes, then time them alternately."""
    from automerge.render import Renderer

    device, dtype = settings.device, settings.dtype
    started = time.perf_counter()
    if settings.size == "tiny":
        pipeline = tiny_pipeline(family, folder, device=device, dtype=dtype)
    else:
        pipeline = real_pipeline(family, device=device, dtype=dtype)
    build_s = time.perf_counter() - started
    jobs = make_jobs(settings.images, side=settings.side(family), steps=settings.steps)
    renderers = {
        size: Renderer(pipeline, batch_size=size, device=device, dtype=TORCH_DTYPES[dtype])
        for size in (1, settings.batch_size)
    }
    for _ in range(settings.warmup):
        for renderer in renderers.values():
            renderer.render(jobs)
    runs: dict[int, list[float]] = {1: [], settings.batch_size: []}
    upcast = 0
    for _ in range(settings.reps):
        for size, renderer in renderers.items():
            out: list[Any] = []
            runs[size].append(seconds(lambda r=renderer, o=out: o.extend(r.render(jobs)), device=device))
            upcast += sum(image.upcast_vae for image in out)
    del pipeline, renderers
    release(device)
    single, batched = Timing.of(runs[1]), Timing.of(runs[settings.batch_size])
    return RenderResult(
        family, settings.side(family), settings.steps, settings.images, settings.batch_size, build_s,
        single, batched, upcast,
    )  # fmt: skip


# -- rewards --------------------------------------------------------------------------------------


def reward_writers(size: str) -> dict[str, Callable[[Path], Path]]:
    """Manifest writers by display name: every tiny random model, or the real-size ImageReward (with
    the tiny test vocabulary: the embedding size does not change the speed)."""
    from automerge.testing import BERT_BASE, TINY_REWARDS, write_random_imagereward

    if size == "real":
        text = dataclasses.replace(BERT_BASE, vocab_words=None)
        return {"imagereward (real size, random)": partial(write_random_imagereward, text=text)}
    return {f"{name} (tiny, random)": write for name, write in TINY_REWARDS.items()}


@dataclass(frozen=True)
class RewardResult:
    name: str
    images: int
    side: int
    load_s: float
    score: Timing

    @property
    def images_per_s(self) -> float:
        return self.images / self.score.median_s


def reward_inputs(count: int, *, side: int) -> tuple[list[Any], list[str], list[str]]:
    """``count`` random images of ``side``² px, prompts, and keys the tiny reference model has."""
    from automerge.testing import tiny_image

    reference_keys = ("item0-s1", "item1-s2")  # write_reference's defaults
    images = [tiny_image(index % len(reference_keys), size=(side, side)) for index in range(count)]
    prompts = [PROMPTS[index % len(PROMPTS)] for index in range(count)]
    keys = [reference_keys[index % len(reference_keys)] for index in range(count)]
    return images, prompts, keys


def measure_reward(
    name: str, write: Callable[[Path], Path], settings: Settings, folder: Path, *, side: int
) -> RewardResult:
    from automerge.rewards import load_reward

    started = time.perf_counter()
    manifest = write(folder / name.split()[0])
    reward = load_reward(manifest, device=settings.device)
    load_s = time.perf_counter() - started
    images, prompts, keys = reward_inputs(settings.images, side=side)
    score = partial(reward.score, images, prompts, keys=keys)
    del reward
    for _ in range(settings.warmup):
        score()
    runs = [seconds(score, device=settings.device) for _ in range(settings.reps)]
    del score
    release(settings.device)
    return RewardResult(name=name, images=settings.images, side=side, load_s=load_s, score=Timing.of(runs))


# -- report ---------------------------------------------------------------------------------------


def _verdict(met: bool, *, gpu_target: bool, device: str) -> str:
    if gpu_target and not device.startswith("cuda"):
        return "GPU target: not measured here"
    return "met" if met else "missed"


def table_rows(
    renders: Sequence[RenderResult], rewards: Sequence[RewardResult], *, settings: Settings
) -> list[tuple[str, ...]]:
    """(what, images/s, s/image, ratio, target/notes) rows."""
    scale = "tiny: informational" if settings.size == "tiny" else "real size"
    if settings.size == "real" and settings.px is not None:
        scale = f"real configs at {settings.px}²: informational"
    rows: list[tuple[str, ...]] = []
    for r in renders:
        what = f"{r.family} {r.side}², {r.steps} steps, {r.images} images"
        rows.append((f"{what}, one by one", f"{r.single_images_per_s:.2f}", f"{1 / r.single_images_per_s:.3f}", "", ""))  # fmt: skip
        verdict = _verdict(r.speedup >= TARGET_BATCH_SPEEDUP, gpu_target=True, device=settings.device)
        rows.append((
            f"{what}, batch {r.batch_size}",
            f"{r.batched_images_per_s:.2f}",
            f"{1 / r.batched_images_per_s:.3f}",
            f"{r.speedup:.2f}×",
            f"≥ {TARGET_BATCH_SPEEDUP}× ({scale}); {verdict}",
        ))  # fmt: skip
    for w in rewards:
        rows.append((f"score: {w.name}, {w.side}² images", f"{w.images_per_s:.2f}", f"{1 / w.images_per_s:.4f}", "", ""))  # fmt: skip
    sdxl = next((r for r in renders if r.family == "sdxl"), None)
    imagereward = next((w for w in rewards if w.name.startswith("imagereward")), None)
    if sdxl is not None and imagereward is not None:
        share = (1 / imagereward.images_per_s) / (1 / sdxl.batched_images_per_s)
        verdict = _verdict(share <= TARGET_IMAGEREWARD_SHARE, gpu_target=True, device=settings.device)
        rows.append((
            "ImageReward time / SDXL render time, per image",
            "",
            "",
            f"{share:.1%}",
            f"≤ {TARGET_IMAGEREWARD_SHARE:.0%} ({scale}); {verdict}",
        ))  # fmt: skip
    return rows


# -- main -----------------------------------------------------------------------------------------


def run(settings: Settings) -> dict[str, Any]:
    """Renders per family, then rewards; a table; the results as plain data."""
    from automerge.errors import RenderError

    if settings.threads:
        torch.set_num_threads(settings.threads)
    machine = {**machine_info(settings.device), "load_average": load_average()}
    renders: list[RenderResult] = []
    rewards: list[RewardResult] = []
    with tempfile.TemporaryDirectory(prefix="render-speed-") as scratch, quiet_libraries():
        folder = Path(scratch)
        for family in settings.families:
            print(f"rendering {family} ...", flush=True)
            try:
                renders.append(measure_render(family, settings, folder))
            except RenderError as error:
                raise SystemExit(
                    f"{family}: {error}; random real-size weights can overflow fp16: try --dtype bf16"
                ) from None
        # Tiny: the tiny reference model's 64² references; real: images of the last family's size.
        side = 64 if settings.size == "tiny" else settings.side(settings.families[-1])
        for name, write in reward_writers(settings.size).items():
            print(f"scoring {name} ...", flush=True)
            rewards.append(measure_reward(name, write, settings, folder, side=side))
    machine["load_average_after"] = load_average()
    title = f"render and score speed: {settings.size}, {settings.device}, {settings.dtype}"
    print_table(table_rows(renders, rewards, settings=settings), title=title, columns=COLUMNS)
    return {"machine": machine, "settings": asdict(settings), "renders": renders, "rewards": rewards}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--size", default="tiny", choices=list(SIZES))
    parser.add_argument("--families", default="sd1,sdxl", help="comma-separated: sd1, sdxl")
    parser.add_argument("--dtype", choices=STORAGE_NAMES, help="default: fp16 on cuda, fp32 on cpu")
    parser.add_argument("--images", type=int, default=8, help="images per timed run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, help="sampler steps (default: tiny 4, real 20)")
    parser.add_argument("--px", type=int, help="override the image side (multiple of 8)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (medians are reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results")
    return parser.parse_args(argv)


def settings_from(options: argparse.Namespace) -> Settings:
    families = tuple(name.strip() for name in options.families.split(",") if name.strip())
    unknown = [name for name in families if name not in SIZES[options.size].px]
    if unknown or not families:
        raise SystemExit(f"--families: unknown {unknown or '(none given)'}; choose from sd1, sdxl")
    if options.px is not None and (options.px < 64 or options.px % 8):
        raise SystemExit(f"--px must be a multiple of 8 and at least 64, got {options.px}")
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is available")
    if min(options.images, options.reps) < 1 or options.batch_size < 2 or options.warmup < 0:
        raise SystemExit(
            "--images and --reps must be at least 1, --batch-size at least 2, --warmup at least 0"
        )
    dtype = options.dtype or ("fp16" if options.device.startswith("cuda") else "fp32")
    return Settings(
        device=options.device,
        size=options.size,
        families=families,
        dtype=dtype,
        images=options.images,
        batch_size=options.batch_size,
        steps=options.steps or SIZES[options.size].steps,
        px=options.px,
        reps=options.reps,
        warmup=options.warmup,
        threads=options.threads,
    )


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    results = run(settings_from(options))
    write_json(options.json, results)
    print(f"wrote {options.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
