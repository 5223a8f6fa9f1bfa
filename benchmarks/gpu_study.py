"""Real sizes on a real GPU (issue 6): SD1- and SDXL-size studies end to end, per-stage timings against
the floors, VRAM and host-memory peaks, and the low-VRAM (offload) mode for 24 GB cards.

One invocation, nothing downloaded. Per phase (``--phase``):

1. sources a, b: random weights at every real key shape (``merge_speed.real_infos``: fp16, EMA and
   scheduler buffers left out), σ·N(0, 1) drawn on the device with a seeded generator (σ = ``--std``;
   values don't change the work); reused when ``--workdir`` already holds the same file;
2. reward models at real size with random weights, written as the published files plus manifests:
   ImageReward (``ImageReward.pt``: BLIP ViT-L/16 + BERT-base, 447 M parameters, with
   ``med_config.json`` and a 30,522-token ``vocab.txt``) and the LAION aesthetic predictor (a CLIP
   ViT-L/14 folder + MLP head), combined by a composite manifest;
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

    python benchmarks/gpu_study.py --cpu-smoke
    python benchmarks/gpu_study.py --phase sd1,sdxl --out $OUT        # then --phase sdxl-lowvram
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from merge_speed import machine_info, real_infos, write_json  # benchmarks/ is the script's folder

from automerge.checkpoints import SafetensorsWriter, open_safetensors
from automerge.merge.engine import LiveEngine
from automerge.study.config import StudyFile, default_storage, load_study_file
from automerge.study.progress import STAGES
from automerge.testing.tiny import write_tiny

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3
GB = 1e9
BERT_VOCAB = 30522  # bert-base-uncased; ImageReward adds [DEC] and [ENC]
PROMPTS = (
    "a lighthouse on a cliff at dusk, crashing waves, oil painting",
    "close-up portrait photo of an old fisherman with a grey beard, overcast harbour light",
    "a bowl of red apples on a wooden table, soft window light, still life",
    "misty pine forest at sunrise, god rays through the trees, photograph",
    "a frozen waterfall under the northern lights, starry sky, long exposure",
    "studio portrait of a young woman with freckles and curly red hair, rim light",
    "medieval hill town above a sea of fog at dawn, ukiyo-e woodblock print",
    "a jazz saxophonist on a smoky stage, blue and amber spotlights",
)


@dataclass(frozen=True)
class Phase:
    """One study configuration: family, real or tiny weights, image size, offload (low-VRAM) mode."""

    name: str
    family: str
    tiny: bool
    size: int  # pixels, square
    offload: bool


PHASES = {
    p.name: p
    for p in (
        Phase("sd1", "sd1", tiny=False, size=512, offload=False),
        Phase("sdxl", "sdxl", tiny=False, size=1024, offload=False),
        Phase("sdxl-lowvram", "sdxl", tiny=False, size=1024, offload=True),
        Phase("tiny-sd1", "sd1", tiny=True, size=64, offload=False),
        Phase("tiny-sdxl-lowvram", "sdxl", tiny=True, size=64, offload=True),
    )
}


@dataclass(frozen=True)
class Settings:
    device: str
    phases: tuple[str, ...]
    trials: int
    images: int
    steps: int
    batch_size: int
    dtype: str  # live and render dtype: fp16 on a GPU, fp32 on the CPU
    reps: int
    std: float
    vram_cap_gib: float
    workdir: Path
    out: Path
    threads: int | None  # torch intra-op threads (None: torch's default)


# -- clocks and memory -----------------------------------------------------------------------------


def timed(fn: Callable[[], T], *, device: torch.device) -> tuple[float, T]:
    """Seconds of ``fn()`` and its value: CUDA events around it on a GPU (after a synchronize), else
    perf_counter."""
    if device.type != "cuda":
        started = time.perf_counter()
        value = fn()
        return time.perf_counter() - started, value
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    value = fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3, value


def seconds(fn: Callable[[], object], *, device: torch.device) -> float:
    return timed(fn, device=device)[0]


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


@dataclass
class MemoryPeak:
    """Peaks over one stage: VRAM allocated / reserved by torch's allocator, host RSS and RssAnon."""

    vram_allocated_bytes: int | None = None
    vram_reserved_bytes: int | None = None
    rss_bytes: int = 0
    rss_anon_bytes: int = 0


class _HostSampler(threading.Thread):
    """Samples VmRSS and RssAnon every ``interval_s`` until stopped (keeps the maxima)."""

    def __init__(self, interval_s: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.rss_kib = self.anon_kib = 0
        self.done = threading.Event()

    def sample(self) -> None:
        self.rss_kib = max(self.rss_kib, _status_kib("VmRSS"))
        self.anon_kib = max(self.anon_kib, _status_kib("RssAnon"))

    def run(self) -> None:
        while not self.done.wait(self.interval_s):
            self.sample()


@contextmanager
def watch_memory(device: torch.device) -> Iterator[MemoryPeak]:
    """Reset the device's peak statistics, sample host memory; the peaks land in the yielded object."""
    peak = MemoryPeak()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    sampler = _HostSampler()
    sampler.sample()
    sampler.start()
    try:
        yield peak
    finally:
        sampler.done.set()
        sampler.join()
        sampler.sample()
        peak.rss_bytes, peak.rss_anon_bytes = sampler.rss_kib * 1024, sampler.anon_kib * 1024
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak.vram_allocated_bytes = int(torch.cuda.max_memory_allocated())
            peak.vram_reserved_bytes = int(torch.cuda.max_memory_reserved())


@contextmanager
def vram_cap(gib: float | None, *, device: torch.device) -> Iterator[None]:
    """Cap this process's allocator at ``gib`` GiB (an allocation past it raises OutOfMemoryError)."""
    if gib is None or device.type != "cuda":
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- files: sources, reward models, payload, study -------------------------------------------------


def write_random_checkpoint(family: str, path: Path, *, seed: int, std: float, device: str) -> Path:
    """A real-size ``family`` file: std·N(0, 1) fp16 per key from one seeded generator on ``device``;
    position ids 0…76. Streamed to ``path`` atomically; seed and std in the header."""
    infos = real_infos(family)
    generator = torch.Generator(device=device).manual_seed(seed)
    metadata = {"gpu_study.seed": str(seed), "gpu_study.std": repr(std)}
    with SafetensorsWriter(path, infos, metadata=metadata) as writer:
        for key, info in infos.items():
            if info.dtype == torch.int64:
                tensor = torch.arange(info.shape[-1], dtype=torch.int64).expand(info.shape).contiguous()
            else:
                draw = torch.randn(info.shape, generator=generator, device=device, dtype=torch.float32)
                tensor = draw.mul_(std).to(info.dtype).cpu()
            writer.write(key, tensor)
    return path


def _same_checkpoint(path: Path, family: str, *, seed: int, std: float) -> bool:
    """``path`` holds what ``write_random_checkpoint`` would write now (header check only)."""
    if not path.is_file():
        return False
    infos = real_infos(family)
    expected = {"gpu_study.seed": str(seed), "gpu_study.std": repr(std)}
    with open_safetensors(path) as checkpoint:
        same_metadata = all(checkpoint.metadata.get(k) == v for k, v in expected.items())
        return same_metadata and all(checkpoint.info(k) == i for k, i in infos.items())


def make_sources(phase: Phase, settings: Settings, folder: Path) -> dict[str, Path]:
    """Models a and b of ``phase`` (tiny: ``write_tiny`` seeds 1, 2; real: random, seeds 1, 2)."""
    kind = "tiny" if phase.tiny else "real"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {letter: folder / f"{kind}-{phase.family}-{letter}.safetensors" for letter in "ab"}
    for seed, path in enumerate(paths.values(), start=1):
        if phase.tiny:
            write_tiny(phase.family, path, seed=seed)
        elif _same_checkpoint(path, phase.family, seed=seed, std=settings.std):
            print(f"  reusing {path.name}")
        else:
            started = time.perf_counter()
            write_random_checkpoint(phase.family, path, seed=seed, std=settings.std, device=settings.device)
            size = path.stat().st_size / GB
            print(f"  wrote {path.name} ({size:.2f} GB, {time.perf_counter() - started:.1f} s)")
    return paths


@contextmanager
def _seeded_on(device: str, seed: int) -> Iterator[None]:
    """torch's global generators (CPU and ``device``) seeded inside the block only (library inits)."""
    devices = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        yield


def _storage_state(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """CPU copies; floating tensors in ``dtype`` (as the published fp16 checkpoints)."""
    return {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu() for k, v in state.items()}


def write_imagereward(folder: Path, *, device: str, dtype: torch.dtype, seed: int = 0) -> Path:
    """ImageReward at its official sizes (BLIP ViT-L/16 at 224 px, BERT-base with cross-attention),
    random init on ``device``: ``ImageReward.pt`` (official key layout), ``med_config.json``,
    ``vocab.txt`` (30,522 tokens) and ``imagereward.yaml``."""
    from automerge.rewards.imagereward import BlipVisionSizes, ImageRewardNet, read_med_config
    from automerge.testing.tiny_rewards import (
        BERT_WORDS,
        official_imagereward_checkpoint,
        tiny_med_config,
        write_bert_vocab,
    )

    folder.mkdir(parents=True, exist_ok=True)
    words = BERT_WORDS + tuple(f"w{i}" for i in range(BERT_VOCAB - 5 - len(BERT_WORDS)))
    write_bert_vocab(folder / "vocab.txt", words)
    med = tiny_med_config(vocab_size=BERT_VOCAB + 2, hidden_size=768, layers=12)
    med.update(num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512)
    vision = BlipVisionSizes()  # the official ViT-L/16
    med["encoder_width"] = vision.hidden_size
    (folder / "med_config.json").write_text(json.dumps(med, indent=2), encoding="utf-8")
    text = read_med_config(folder / "med_config.json").config(encoder_hidden_size=vision.hidden_size)
    with _seeded_on(device, seed):
        net = ImageRewardNet(vision.config(), text)
    state = official_imagereward_checkpoint(net, seed=seed)
    torch.save(_storage_state(state, dtype), folder / "ImageReward.pt")
    weights = {"model": "ImageReward.pt", "med_config": "med_config.json", "vocab": "vocab.txt"}
    return _write_yaml(
        folder / "imagereward.yaml",
        {"reward": "imagereward", "weights": weights, "options": {"vision": vision.model_dump()}},
    )


def _clip_vit_l14_config() -> Any:
    """openai/clip-vit-large-patch14: ViT-L/14 at 224 px, 12-layer 768-wide text tower, 768-d projection."""
    from transformers import CLIPConfig

    text = {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
        "projection_dim": 768,
    }
    vision = {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
        "projection_dim": 768,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)


def write_laion_aesthetic(folder: Path, *, device: str, dtype: torch.dtype, seed: int = 0) -> Path:
    """A full CLIP ViT-L/14 folder (random init on ``device``, saved in ``dtype``), a random MLP head
    (``layers.N``, 768 inputs), the manifest."""
    from transformers import CLIPModel

    from automerge.rewards.heads import ScoreHead

    folder.mkdir(parents=True, exist_ok=True)
    with _seeded_on(device, seed):
        model = CLIPModel(_clip_vit_l14_config())
    model.to(dtype).save_pretrained(folder / "clip")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        head = ScoreHead(768)
    torch.save(head.state_dict(), folder / "head.pth")
    return _write_yaml(
        folder / "laion-aesthetic.yaml",
        {"reward": "laion-aesthetic", "weights": {"clip": "clip", "head": "head.pth"}},
    )


def _write_yaml(path: Path, data: Mapping[str, Any]) -> Path:
    """Atomically: a temporary file in the same folder, then os.replace."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(dict(data), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _set_manifest(path: Path, **fields: Any) -> Path:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return _write_yaml(path, {**data, **fields})


def make_rewards(settings: Settings, folder: Path, *, tiny: bool) -> Path:
    """ImageReward and LAION-aesthetic manifests (tiny or real size) and their composite (reused)."""
    from automerge.testing.tiny_rewards import write_tiny_imagereward, write_tiny_laion_aesthetic

    composite = folder / "composite.yaml"
    if composite.is_file():  # written last: the members are complete
        print(f"  reusing {folder.name}")
        return composite
    started = time.perf_counter()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[settings.dtype]
    if tiny:
        members = [
            write_tiny_imagereward(folder / "imagereward"),
            write_tiny_laion_aesthetic(folder / "laion"),
        ]
    else:
        options = {"device": settings.device, "dtype": dtype}
        members = [
            write_imagereward(folder / "imagereward", **options),
            write_laion_aesthetic(folder / "laion", **options),
        ]
    for manifest in members:
        _set_manifest(manifest, device=settings.device, dtype=settings.dtype, batch_size=8)
    print(f"  wrote {folder.name} reward models ({time.perf_counter() - started:.1f} s)")
    return _write_yaml(
        composite,
        {
            "reward": "composite",
            "name": "imagereward+laion-aesthetic",
            "members": [{"manifest": str(m.relative_to(folder)), "weight": 1.0} for m in members],
        },
    )


def make_study(
    phase: Phase, settings: Settings, folder: Path, *, sources: Mapping[str, Path], reward: Path
) -> StudyFile:
    """A fresh study (old storage and artifacts removed): payload, study file, loaded and checked."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in (folder / "study.db", folder / "study-artifacts"):
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink(missing_ok=True)
    items = [{"prompt": PROMPTS[i % len(PROMPTS)], "seeds": [i + 1]} for i in range(settings.images)]
    defaults = {
        "steps": settings.steps,
        "cfg": 6.0,
        "width": phase.size,
        "height": phase.size,
        "scheduler": "euler" if phase.tiny else "dpmpp_2m_karras",
        "negative_prompt": "lowres, blurry, watermark",
    }
    payload = _write_yaml(folder / "payload.yaml", {"defaults": defaults, "items": items})
    study = {
        "name": f"gpu-{phase.name}",
        "models": {name: str(path) for name, path in sources.items()},
        "method": "weighted_sum",
        "search": {"alpha": {"blocks": "all", "low": 0.0, "high": 1.0}},
        "payloads": [str(payload)],
        "reward": str(reward),
        "sampler": {"name": "gp", "seed": 0, "startup_trials": min(4, settings.trials)},
        "trials": settings.trials,
        "early_stopping": None,
        "baselines": True,
        "render": {
            "device": settings.device,
            "dtype": settings.dtype,
            "batch_size": settings.batch_size,
            "offload": phase.offload,
        },
        "export": {"dir": str(folder / "export"), "dtype": "fp16"},
    }
    return load_study_file(_write_yaml(folder / "study.yaml", study))


# -- measurements ----------------------------------------------------------------------------------


@dataclass
class StageStat:
    median_s: float
    share: float  # of the sum of every stage's median (the median trial)
    runs_s: list[float]


@dataclass
class StudyResult:
    wall_s: float
    startup_s: float  # wall minus every trial's stages: sources, pipeline, reward, storage
    completed: int
    failed: int
    fail_reasons: list[str]
    stages: dict[str, StageStat]
    trial_median_s: float | None
    first_trial_s: float | None
    memory: MemoryPeak


def study_stages(study_file: StudyFile) -> tuple[dict[str, StageStat], list[float], int, list[str]]:
    """Per stage: median seconds over completed trials and share; per-trial totals; failures."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=study_file.name, storage=default_storage(study_file))
    done = [t for t in study.trials if t.state == TrialState.COMPLETE and "timings" in t.user_attrs]
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    runs = {stage: [float(t.user_attrs["timings"].get(stage, 0.0)) for t in done] for stage in STAGES}
    medians = {stage: statistics.median(v) for stage, v in runs.items() if v}
    total = sum(medians.values()) or 1.0
    stages = {s: StageStat(m, m / total, runs[s]) for s, m in medians.items()}
    totals = [sum(float(x) for x in t.user_attrs["timings"].values()) for t in done]
    reasons = [str(t.user_attrs.get("fail_reason", "?"))[:300] for t in failed]
    return stages, totals, len(failed), reasons


def run_phase_study(phase: Phase, settings: Settings, study_file: StudyFile) -> StudyResult:
    from rich.console import Console

    from automerge.study.runner import run_study

    device = torch.device(settings.device)
    with watch_memory(device) as memory:
        started = time.perf_counter()
        run_study(study_file, device=settings.device, export=False, console=Console(width=160))
        wall = time.perf_counter() - started
    stages, totals, failed, reasons = study_stages(study_file)
    return StudyResult(
        wall_s=wall,
        startup_s=wall - sum(totals),
        completed=len(totals),
        failed=failed,
        fail_reasons=reasons,
        stages=stages,
        trial_median_s=statistics.median(totals) if totals else None,
        first_trial_s=totals[0] if totals else None,
        memory=memory,
    )


@dataclass
class RemergeResult:
    blocks: int
    bytes_out: int  # of the re-merged blocks' live buffers
    merge_s: list[float]
    floor_s: list[float]  # torch.add over the same element counts, on the device
    h2d_s: list[float] | None  # offload: both sources' block bytes from pinned host memory
    memory: MemoryPeak

    @property
    def merge_median_s(self) -> float:
        return statistics.median(self.merge_s)

    @property
    def floor_median_s(self) -> float:
        return statistics.median(self.floor_s)

    @property
    def ratio(self) -> float:
        return self.merge_median_s / self.floor_median_s

    @property
    def offload_floor_s(self) -> float | None:
        return None if self.h2d_s is None else statistics.median(self.h2d_s) + self.floor_median_s

    @property
    def offload_ratio(self) -> float | None:
        floor = self.offload_floor_s
        return None if floor is None else self.merge_median_s / floor


def _alpha_values(runtime: Any, step: int) -> dict[str, float]:
    """A different α for every dimension at every step: 0.3 + 0.01·step + 0.001·i."""
    return {d.name: round(0.3 + 0.01 * step + 0.001 * i, 6) for i, d in enumerate(runtime.space.dimensions)}


def measure_remerge(runtime: Any, settings: Settings) -> RemergeResult:
    """All searched blocks re-merged ``reps`` times (α changed each time), interleaved with the floors."""
    engine: LiveEngine = runtime.engine
    device = runtime.device
    with watch_memory(device) as memory:
        engine.apply(runtime.params_for(_alpha_values(runtime, 0)))  # warm-up: every block, VAE copied
        merged = engine.apply(runtime.params_for(_alpha_values(runtime, 1)))
        itemsize = engine.options.dtype.itemsize
        numels = [engine.block_bytes()[name] // itemsize for name in sorted(merged)]
        largest = max(numels)
        a = torch.randn(largest, device=device, dtype=engine.options.dtype)
        b, out = a.flip(0), torch.empty_like(a)

        def floor() -> None:
            for n in numels:
                torch.add(a[:n], b[:n], out=out[:n])

        offload = engine.options.offload and device.type == "cuda"
        if offload:
            source_dtype = engine.options.source_dtype or engine.options.dtype
            host = torch.empty(largest, dtype=source_dtype, pin_memory=True).copy_(a.cpu())
            staged = torch.empty(largest, dtype=source_dtype, device=device)

        def h2d() -> None:
            for n in numels:
                for _ in engine.plan.sources:
                    staged[:n].copy_(host[:n], non_blocking=True)

        floor()
        merge_s, floor_s, h2d_s = [], [], []
        for step in range(2, settings.reps + 2):
            params = runtime.params_for(_alpha_values(runtime, step))
            floor_s.append(seconds(floor, device=device))
            merge_s.append(seconds(partial(engine.apply, params), device=device))
            if offload:
                h2d_s.append(seconds(h2d, device=device))
    bytes_out = sum(numels) * itemsize
    return RemergeResult(len(numels), bytes_out, merge_s, floor_s, h2d_s if offload else None, memory)


@dataclass
class RenderResult:
    images: int
    batch_size: int
    batched_s: list[float]
    single_s: list[float]
    max_pixel_difference: int  # batched vs one by one, 8-bit
    memory: MemoryPeak

    @property
    def batched_images_per_s(self) -> float:
        return self.images / statistics.median(self.batched_s)

    @property
    def single_images_per_s(self) -> float:
        return self.images / statistics.median(self.single_s)

    @property
    def speedup(self) -> float:
        return self.batched_images_per_s / self.single_images_per_s


def measure_render(runtime: Any, settings: Settings) -> tuple[RenderResult, list[Any]]:
    """The study's jobs rendered by its renderer (batch ``--batch-size``) and one by one, alternately."""
    import numpy as np

    from automerge.render.renderer import Renderer

    device = runtime.device
    jobs = [job.job for job in runtime.jobs]
    batched = runtime.renderer
    single = Renderer(batched.pipeline, batch_size=1, device=device, dtype=runtime.dtype)
    render_reps = max(1, settings.reps // 3)
    with watch_memory(device) as memory:
        single.render(jobs[:1])  # warm-up of the batch-1 shapes (the study warmed the batched ones)
        batched_s, single_s = [], []
        for _ in range(render_reps):
            elapsed, together = timed(lambda: batched.render(jobs), device=device)
            batched_s.append(elapsed)
            elapsed, alone = timed(lambda: single.render(jobs), device=device)
            single_s.append(elapsed)
    difference = max(
        int(np.abs(np.asarray(x.image, dtype=np.int16) - np.asarray(y.image, dtype=np.int16)).max())
        for x, y in zip(together, alone, strict=True)
    )
    result = RenderResult(len(jobs), batched.batch_size, batched_s, single_s, difference, memory)
    return result, together


@dataclass
class ScoreTiming:
    images: int
    score_s: list[float]
    memory: MemoryPeak

    @property
    def images_per_s(self) -> float:
        return self.images / statistics.median(self.score_s)


def measure_score(runtime: Any, images: Sequence[Any], settings: Settings) -> ScoreTiming:
    """The study's reward (composite) on the rendered images: warm-up, then ``reps`` timed calls."""
    device = runtime.device
    pil = [r.image for r in images]
    prompts = [r.job.prompt for r in images]
    keys = [r.job.key for r in images]
    with watch_memory(device) as memory:
        runtime.reward.score(pil, prompts, keys=keys)
        runs = [
            seconds(lambda: runtime.reward.score(pil, prompts, keys=keys), device=device)
            for _ in range(settings.reps)
        ]
    return ScoreTiming(len(pil), runs, memory)


@dataclass
class PhaseResult:
    phase: Phase
    vram_cap_gib: float | None
    sources_bytes: dict[str, int] = field(default_factory=dict)
    study: StudyResult | None = None
    construct_s: float | None = None
    construct_memory: MemoryPeak | None = None
    remerge: RemergeResult | None = None
    render: RenderResult | None = None
    score: ScoreTiming | None = None
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0


@contextmanager
def recorded(result: PhaseResult, what: str) -> Iterator[None]:
    """Run a step; an exception is recorded (and printed) instead of ending the benchmark."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - a benchmark keeps going: the other steps and phases still report
        traceback.print_exc()
        result.errors.append(f"{what}: {type(error).__name__}: {str(error)[:500]}")


def run_phase(phase: Phase, settings: Settings) -> PhaseResult:
    """Files, the study, then the micro-benchmarks with a fresh runtime; errors recorded per step."""
    from automerge.study.runtime import StudyRuntime

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
        free_device_memory()
        with recorded(result, "micro-benchmarks"):
            print(f"[{phase.name}] re-merge, render and score benchmarks")
            with watch_memory(device) as memory:
                construct_started = time.perf_counter()
                runtime = StudyRuntime(study_file, device=settings.device)
                result.construct_s = time.perf_counter() - construct_started
            result.construct_memory = memory
            try:
                result.remerge = measure_remerge(runtime, settings)
                result.render, images = measure_render(runtime, settings)
                result.score = measure_score(runtime, images, settings)
            finally:
                runtime.close()
                del runtime
                free_device_memory()
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


def print_table(results: Sequence[PhaseResult], *, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    columns = [table_rows(r) for r in results]
    metrics = list(dict.fromkeys(m for column in columns for m in column))
    print(title)
    table = Table(title="gpu_study: per phase")
    table.add_column("metric")
    for result in results:
        table.add_column(result.phase.name, justify="right")
    for metric in metrics:
        table.add_row(metric, *(column.get(metric, "—") for column in columns))
    Console(width=200).print(table)
    for result in results:
        for error in result.errors:
            print(f"[{result.phase.name}] {error}")


def versions() -> dict[str, str]:
    import importlib.metadata

    names = ("torch", "diffusers", "transformers", "optuna", "pydantic", "safetensors")
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


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
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="live/render dtype (fp16 on a GPU)")
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
    phases = tuple(
        p.strip()
        for p in (args.phase or ("tiny-sd1,tiny-sdxl-lowvram" if smoke else "sd1,sdxl,sdxl-lowvram")).split(
            ","
        )
        if p.strip()
    )
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise SystemExit(f"--phase: unknown {', '.join(unknown)}; known: {', '.join(PHASES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch {torch.__version__} sees no CUDA GPU (try --cpu-smoke)")
    out = args.out or Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
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
        "machine": {**machine_info(settings.device), "versions": versions()},
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
    print_table(
        results,
        title=f"gpu_study on {where}: {settings.trials} trials, {settings.images} images, {settings.steps} steps, "
        f"{settings.dtype}, torch {torch.__version__}",
    )
    print(f"wrote {json_path} ({data['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
